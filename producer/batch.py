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
from worker.core.schema import Item
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


ENDPOINTS = {"responses": "/v1/responses", "anthropic": "/v1/messages", "completions": "/v1/completions"}


def batch_endpoint(first: Item | None) -> str:
    """The endpoint the job's requests were written for (its first item's API); a native job is
    ``/v1/completions`` when it starts with a plain prompt, else ``/v1/chat/completions``."""
    if first is None:
        return "/v1/chat/completions"
    api = first.api or ("completions" if first.prompt is not None else "chat")
    return ENDPOINTS.get(api, "/v1/chat/completions")


def completion_window(expires_at: float | None, created_at: float) -> str:
    """OpenAI's ``completion_window``, always a string as its types require: the job's expiry
    (``--expires-in``) in hours (``"24h"``) when whole, else in seconds (``"90s"``); ``"none"``
    for a job that never expires."""
    if expires_at is None:
        return "none"
    seconds = round(expires_at - created_at)
    return f"{seconds // 3600}h" if seconds and seconds % 3600 == 0 else f"{seconds}s"


def batch_object(state: JobState, files: dict[str, str | None], *, endpoint: str) -> dict[str, Any]:
    spec, counts = state.spec, state.counts
    ended = _ts(state.finished_at) if state.final else None
    window = completion_window(spec.expires_at, spec.created_at)
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
