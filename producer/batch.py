"""A job as OpenAI's Batch object (`genq status JOB --json --format openai`).

Statuses map as: ``submitting`` → ``validating``; ``queued`` and ``in_progress`` →
``in_progress`` (``in_progress_at`` stays null until a worker starts the first chunk);
``cancelling``, ``cancelled``, ``expired`` and ``completed`` keep their names.  ``failed`` never
happens: a file that fails validation is refused before a job exists, and a job whose items
all errored is ``completed`` with its ``request_counts.failed`` (as OpenAI reports it).
``output_file_id`` and ``error_file_id`` are the paths the last `genq collect` wrote.
"""

from __future__ import annotations

from typing import Any

from worker.core.jobstate import JobState
from worker.core.states import JobStatus

STATUS: dict[JobStatus, str] = {
    JobStatus.SUBMITTING: "validating",
    JobStatus.QUEUED: "in_progress",
    JobStatus.IN_PROGRESS: "in_progress",
    JobStatus.CANCELLING: "cancelling",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.EXPIRED: "expired",
    JobStatus.COMPLETED: "completed",
}


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(state: JobState, files: dict[str, str | None], *, endpoint: str) -> dict[str, Any]:
    spec, counts = state.spec, state.counts
    ended = _ts(state.finished_at) if state.final else None
    window = None if spec.expires_at is None else f"{round(spec.expires_at - spec.created_at)}s"
    return {
        "id": spec.job_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": spec.source,
        "completion_window": window,
        "status": STATUS[state.status],
        "output_file_id": files.get("output_file"),
        "error_file_id": files.get("error_file"),
        "created_at": _ts(spec.created_at),
        "in_progress_at": _ts(state.started_at),
        "expires_at": _ts(spec.expires_at),
        "finalizing_at": None,
        "completed_at": ended if state.status == JobStatus.COMPLETED else None,
        "failed_at": None,
        "expired_at": ended if state.status == JobStatus.EXPIRED else None,
        "cancelling_at": None,
        "cancelled_at": ended if state.status == JobStatus.CANCELLED else None,
        "request_counts": {"total": counts.total, "completed": counts.succeeded, "failed": counts.errored},
        "metadata": {"profile": spec.profile},
    }
