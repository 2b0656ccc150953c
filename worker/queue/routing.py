"""Queue names: ``genq.<profile>.<mode>`` with mode ``nf4``, ``fp32`` or ``any``.  A worker
consumes its own mode's queue first, then ``any``; a job goes to ``any`` unless it asks for a mode.
(Names only: nothing here imports Celery.)"""

from __future__ import annotations

from worker.core.schema import ChunkRef
from worker.core.states import Mode, QueueMode

TASK_NAME = "genq.run_chunk"


def queue_name(profile: str, mode: QueueMode | Mode) -> str:
    return f"genq.{profile}.{QueueMode(mode)}"


def worker_queues(profile: str, mode: Mode) -> list[str]:
    """What a worker of ``mode`` consumes: its own mode's queue first, then ``any``."""
    return [queue_name(profile, mode), queue_name(profile, QueueMode.ANY)]


def task_id(ref: ChunkRef) -> str:
    """Deterministic Celery task id: publishing the same chunk again cannot create a second task
    identity, and a message names its job."""
    return f"{ref.job_id}:{ref.chunk_id}"
