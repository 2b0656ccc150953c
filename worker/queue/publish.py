"""Publishing chunks as Celery task messages, a pipelined batch at a time, into the job's backlog.

``app.send_task`` costs a Redis round trip or more per message (a binding lookup for the queue's
exchange, the LPUSH, a ``task-sent`` event): about 1,400 messages a second here, 45 s for the
62,500 chunks of a million-item job.  :func:`publish_chunks` builds the same messages with
Celery's and kombu's own code (``as_task_v2``, ``prepare_message``, kombu's body encoding and
priority lists), addressed to the queue through the default exchange (``routing_key`` = the
queue, which is also how kombu restores them), and appends them to the job's backlog in pipelines
of :data:`BATCH`; the dispatcher (:mod:`worker.store.dispatch`) moves them to the broker queue, a
few at a time and round robin between jobs, exactly as kombu would have found them there.
tests/test_queue_layout.py compares these messages with what ``send_task`` writes and has a real
worker consume them.  No ``task-sent`` event is sent (Flower still sees every task from the
worker's own events).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as envelope

from worker.core.schema import ChunkRef, JobSpec
from worker.queue.app import get_app
from worker.queue.routing import TASK_NAME, publish_targets, queue_name, task_id

if TYPE_CHECKING:
    from worker.store.dispatch import Dispatcher

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
    spec: JobSpec,
    chunks: dict[str, list[int]],
    celery_app: Celery | None = None,
    *,
    store: Dispatcher | None = None,
) -> int:
    """Append one message per chunk to the job's backlog for its queue (profile, mode, priority)
    and dispatch; returns how many.  Task ids are ``<job>:<chunk>@<inc>``, so publishing the same chunk
    again cannot create a second task identity.  ``store``: the job store (default: one on the
    app's broker, which is the job store's Redis too).  With no chunks it only puts the job back
    in its queue's ring (a resumed submit whose last publish was cut short)."""
    app = celery_app or get_app()
    if store is None:
        from worker.store import RedisStore

        store = RedisStore(str(app.conf.broker_url))
    queue = queue_name(spec.profile, spec.mode, spec.priority)
    targets = publish_targets(spec.profile, spec.mode, spec.priority)
    if not chunks:  # nothing new: make sure a backlog left by an interrupted publish is served
        store.enqueue(spec.job_id, queue, [[]], inc=spec.incarnation, targets=targets)
        return 0
    refs = [
        ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=idx, inc=spec.incarnation)
        for cid, idx in chunks.items()
    ]
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        # the list kombu consumes for this queue (priority 0: the queue's own name)
        key = channel._q_for_pri(queue, channel.priority(0))

        def batches() -> Iterator[list[str]]:
            for start in range(0, len(refs), BATCH):
                yield [_message(app, channel, ref, queue, 0) for ref in refs[start : start + BATCH]]

        return store.enqueue(spec.job_id, key, batches(), inc=spec.incarnation, targets=targets)
