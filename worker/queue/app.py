"""The Celery app and its configuration (no torch import).

``celery -A worker.queue.app worker -Q genq.tiny-random.fp32,genq.tiny-random.any --pool solo``
works too: set ``GENQ_PROFILE`` (and optionally ``GENQ_MODE``) and the model is loaded once per
process (see :mod:`worker.runtime`).  The module's ``app`` is built on first use, never by merely
importing this package.
"""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery

from worker.core.settings import Settings, get_settings
from worker.queue.redelivery import transport_options
from worker.store.connection import broker_url

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def quiet_celery() -> None:
    """Celery's warnings that tell a genq operator nothing to do (printed as multi-line blocks):

    * SecurityWarning "running the worker with superuser privileges": root is the norm in a
      container, and the danger it warns of is executing pickled messages; genq accepts JSON only
      (below), which is why Celery only warns instead of refusing to start;
    * CPendingDeprecationWarning on each lost connection, about the default of
      ``worker_cancel_long_running_tasks_on_connection_loss`` changing in Celery 6: genq sets it."""
    from celery.exceptions import CPendingDeprecationWarning, SecurityWarning

    warnings.filterwarnings("ignore", message=r".*superuser privileges", category=SecurityWarning)
    warnings.filterwarnings(
        "ignore", message=r"\s*In Celery 5.1 we introduced", category=CPendingDeprecationWarning
    )


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    quiet_celery()
    app = Celery("genq", broker=broker_url(settings.broker or DEFAULT_BROKER), include=["worker.queue.task"])
    options = transport_options(settings)
    # BRPOP names the worker's queues in the order given (worker_queues: high, normal, low) and
    # never rotates them: a waiting high chunk is always taken before a normal or low one
    broker_options = {**options, "queue_order_strategy": "priority"}
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
        broker_transport_options=broker_options,
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
        # Celery's consumer, waiting (and saying so once a minute) while Redis is at maxmemory
        worker_consumer="worker.queue.consumer:Consumer",
        broker_pool_limit=4,
    )
    return app


_app: Celery | None = None


def get_app() -> Celery:
    """The process's app, built from the settings on first use."""
    global _app
    if _app is None:
        _app = make_app()
    return _app


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):  # what `celery -A worker.queue.app` looks up
        return get_app()
    raise AttributeError(name)
