"""A snapshot of a job, and the figures derived from it: what `genq status`, the progress bar and
``Job.wait`` show, for jobs in Redis and for embedded runs alike (one progress model)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from worker.core.schema import Counts, JobSpec
from worker.core.states import JobStatus


@dataclass
class JobState:
    spec: JobSpec
    status: JobStatus
    counts: Counts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    first_finished_at: float | None = None
    """When the job first ended; a ``genq retry`` round later does not move it, so throughput
    figures stay those of the real run."""
    updated_at: float | None = None
    workers: dict[str, dict[str, int]] = field(default_factory=dict)
    inputs_written: int = 0
    """Submit progress: items stored so far (equals ``total`` once the inputs are complete)."""
    submitting: bool = False
    """A process holds the job's submit lock right now (False for a partial job whose submit
    died: run the same submit again to resume it, or `genq delete` it)."""
    ending: str | None = None
    """``cancelled`` or ``expired`` while the status is ``cancelling``."""
    live_chunks: int = 0
    """Chunks a live worker runs now."""
    redis_bytes: int | None = None
    """Memory the job's keys take in Redis (filled in for listings)."""

    @property
    def final(self) -> bool:
        return self.status.final

    @property
    def partial(self) -> bool:
        """The submit did not finish and nobody is finishing it."""
        return self.status == JobStatus.SUBMITTING and not self.submitting

    @property
    def stale(self) -> bool:
        """Pending work, no live worker on it and no progress for ten minutes."""
        quiet = self.updated_at is None or time.time() - self.updated_at > 600
        return self.status == JobStatus.IN_PROGRESS and self.live_chunks == 0 and quiet

    @property
    def elapsed(self) -> float:
        """Seconds from the first chunk to the first end (or now)."""
        if self.started_at is None:
            return 0.0
        end = self.first_finished_at or self.finished_at or time.time()
        return max(end - self.started_at, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.elapsed if self.started_at else 0.0

    @property
    def items_per_second(self) -> float:
        return self.counts.finished / self.elapsed if self.started_at else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.items_per_second
        if self.final or rate <= 0:
            return None
        return self.counts.pending / rate

    @property
    def label(self) -> str:
        """The status as a listing shows it (``partial`` and ``stale`` made visible)."""
        if self.partial:
            return "partial"
        if self.stale:
            return "stale"
        return str(self.status)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.spec.job_id,
            "status": str(self.status),
            "label": self.label,
            "profile": self.spec.profile,
            "mode": str(self.spec.mode),
            "counts": self.counts.as_dict(),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "tokens_per_second": round(self.tokens_per_second, 2),
            "items_per_second": round(self.items_per_second, 3),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "created_at": self.spec.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "first_finished_at": self.first_finished_at,
            "expires_at": self.spec.expires_at,
            "inputs_written": self.inputs_written,
            "redis_bytes": self.redis_bytes,
            "workers": self.workers,
        }
