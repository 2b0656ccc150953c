"""Publishing chunks as Celery task messages, a pipelined batch at a time.

``app.send_task`` costs a Redis round trip or more per message (a binding lookup for the queue's
exchange, the LPUSH, a ``task-sent`` event): about 1,400 messages a second here, 45 s for the
62,500 chunks of a million-item job.  :func:`publish_chunks` builds the same messages with
Celery's and kombu's own code (``as_task_v2``, ``prepare_message``, kombu's body encoding and
priority lists) and sends them to the queue through the default exchange (``routing_key`` = the
queue, which is also how kombu restores them) in pipelines of :data:`BATCH` LPUSHes.
tests/test_queue_layout.py compares these messages with what ``send_task`` writes and has a real
worker consume them.  No ``task-sent`` event is sent (Flower still sees every task from the
worker's own events).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as envelope

from worker.core.schema import ChunkRef, JobSpec
from worker.queue.app import get_app
from worker.queue.routing import TASK_NAME, queue_name, task_id

BATCH = 1000
"""Messages per pipelined round trip."""

PERSISTENT = 2
"""AMQP delivery mode of task messages (what Celery's queues declare)."""


def _message(app: Celery, channel: Any, ref: ChunkRef, queue: str, priority: int) -> str:
    """One task message, serialised exactly as kombu's Redis transport stores it."""
    tid = task_id(ref)
    # the options send_task would pass for this task, so the message is the one it would write
    # (a short argsrepr: Celery's own saferepr of the index list costs more than the rest)
    task = app.amqp.as_task_v2(
        tid,
        TASK_NAME,
        args=[ref.model_dump()],
        kwargs={},
        reply_to=app.thread_oid,
        ignore_result=None,
        argsrepr=f"[{tid} ({len(ref.indices)} items)]",
        kwargsrepr="{}",
    )
    content_type, content_encoding, body = serialize(task.body, serializer="json")
    properties = {**task.properties, "delivery_mode": PERSISTENT}
    message = channel.prepare_message(
        body, priority, content_type, content_encoding, task.headers, properties
    )
    channel._inplace_augment_message(message, "", queue)  # the default exchange: straight to the queue
    return str(envelope(message))


def publish_chunks(
    spec: JobSpec, chunks: dict[str, list[int]], celery_app: Celery | None = None, *, priority: int = 0
) -> int:
    """Enqueue one message per chunk on the job's queue; returns how many.  Task ids are
    ``<job>:<chunk>``, so publishing the same chunk again cannot create a second task identity."""
    if not chunks:
        return 0
    app = celery_app or get_app()
    queue = queue_name(spec.profile, spec.mode)
    refs = [ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=idx) for cid, idx in chunks.items()]
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        key = channel._q_for_pri(queue, channel.priority(priority))
        client = channel.client
        for start in range(0, len(refs), BATCH):
            pipe = client.pipeline(transaction=False)
            for ref in refs[start : start + BATCH]:
                pipe.lpush(key, _message(app, channel, ref, queue, priority))
            pipe.execute()
    return len(refs)
