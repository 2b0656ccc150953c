"""The Celery app, its configuration and queue names (no torch import).

Queues come from profile and mode: ``genq.<profile>.nf4``, ``genq.<profile>.fp32`` and
``genq.<profile>.any``.  A worker consumes its own mode's queue and ``any``.

``celery -A worker.app worker -Q genq.tiny-random.fp32,genq.tiny-random.any --pool solo`` works
too: set ``GENQ_PROFILE`` (and optionally ``GENQ_MODE``) and the model is loaded once per process
(see :mod:`worker.runtime`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.core.schema import ChunkRef, JobSpec, task_id
from worker.core.settings import Settings, get_settings
from worker.core.states import Mode, QueueMode

TASK_NAME = "genq.run_chunk"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def queue_name(profile: str, mode: QueueMode | Mode) -> str:
    return f"genq.{profile}.{QueueMode(mode)}"


def worker_queues(profile: str, mode: Mode) -> list[str]:
    """What a worker of ``mode`` consumes: its own mode's queue first, then ``any``."""
    return [queue_name(profile, mode), queue_name(profile, QueueMode.ANY)]


def restore_timing(visibility_timeout: int) -> tuple[float, int]:
    """kombu's unacked-restore sweep ``(interval, throttle)`` derived from the visibility timeout.

    kombu sweeps every ``interval × throttle`` seconds (100 s by default, whatever the timeout), and a
    sweep returns messages older than the visibility timeout.  A throttle of 1 and an interval of a
    quarter of the timeout (1 s to 60 s) bring a dead worker's chunk back within about
    1.25 × the timeout."""
    return float(min(60, max(1, visibility_timeout // 4))), 1


def transport_options(settings: Settings) -> dict[str, Any]:
    interval, throttle = restore_timing(settings.visibility_timeout)
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": throttle,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
        "retry_on_timeout": True,
    }


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("genq", broker=settings.broker or DEFAULT_BROKER, include=["worker.tasks"])
    options = transport_options(settings)
    app.conf.update(
        # JSON only: a pickled message is refused, never executed
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # a chunk is acknowledged only once its results are written; a dead worker's chunk returns
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=options,
        result_backend_transport_options=options,
        # results live in the job store, not in a Celery result backend
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # task events for Flower
        worker_send_task_events=True,
        task_send_sent_event=True,
        # ride out broker restarts
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # loading a 7B model in a prefork child takes minutes, not Celery's default 4 s
        worker_proc_alive_timeout=1800.0,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_default_queue="genq.default",
        task_create_missing_queues=True,
        broker_pool_limit=4,
    )
    return app


app = make_app()


def publish_chunks(spec: JobSpec, chunks: dict[str, list[int]], celery_app: Celery | None = None) -> int:
    """Enqueue one message per chunk on the job's queue.  Task ids are ``<job>:<chunk>``, so
    publishing the same chunk again cannot create a second task identity."""
    celery_app = celery_app or app
    queue = queue_name(spec.profile, spec.mode)
    with celery_app.producer_or_acquire() as producer:
        for cid, indices in chunks.items():
            ref = ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=indices)
            celery_app.send_task(
                TASK_NAME,
                args=[ref.model_dump()],
                task_id=task_id(spec.job_id, cid),
                queue=queue,
                producer=producer,
            )
    return len(chunks)
