"""Every closed set of states in genq, as ``StrEnum``s (no torch, Redis or Celery).

They are ``str`` subclasses: they compare equal to their values, serialise as their values in JSON
and pydantic models, and ``JobStatus("queued")`` parses what the store holds.  A value outside the
set is refused where it is read, instead of travelling on as a string nobody checks.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How a worker holds the model."""

    NF4 = "nf4"
    """4-bit NF4 through bitsandbytes (a CUDA GPU, or bitsandbytes' CPU backend)."""
    FP32 = "fp32"
    """fp32 on the CPU, the adapter merged."""


class LoadMode(StrEnum):
    """What a worker is asked to load: a mode, or ``auto`` to let the hardware decide."""

    AUTO = "auto"
    NF4 = "nf4"
    FP32 = "fp32"


class QueueMode(StrEnum):
    """Which workers may take a job's chunks."""

    ANY = "any"
    NF4 = "nf4"
    FP32 = "fp32"


class Priority(StrEnum):
    """A job's priority: each level is a queue of its own, consumed strictly in this order."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class JobStatus(StrEnum):
    """A job's life: ``submitting`` → ``queued`` → ``in_progress`` → one of the final ones."""

    SUBMITTING = "submitting"
    """Inputs are being written or chunks published; the job's keys carry a TTL until the submit
    finishes.  The same ``genq submit`` resumes it; ``genq delete`` removes it."""
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    """Cancel asked; chunks in flight finish their micro-batch."""
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


class ItemStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


class FinishReason(StrEnum):
    STOP = "stop"
    """An end-of-sequence token or a stop string."""
    LENGTH = "length"
    """``max_new_tokens`` (or the context) ran out."""


class CountField(StrEnum):
    """The job counters a finished item moves (exactly one of them)."""

    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class ChunkOutcome(StrEnum):
    """What happened to one delivery of a chunk."""

    DONE = "done"
    """Generated (some items may have errored)."""
    SKIPPED = "skipped"
    """Nothing left to do: every item had a result, or the job was final."""
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SPLIT = "split"
    """Past the attempt cap, or an unexpected engine error: split in two and republished."""
    WORKER_LOST = "worker_lost"
    """An item alone in its chunk past the attempt cap: recorded as ``worker_lost``."""
    HANDED_BACK = "handed_back"
    """Shutdown: the unfinished part goes back to the queue."""
    REFUSED = "refused"
    """A chunk of a profile this worker does not serve (a hand-made message)."""


class ErrorCode(StrEnum):
    """``error.type`` of an errored item, and ``code`` of genq's errors."""

    GENQ_ERROR = "genq_error"
    PERMANENT_ERROR = "permanent_error"
    TRANSIENT_ERROR = "transient_error"
    INVALID_INPUT = "invalid_input"
    CONFIG_ERROR = "config_error"
    BAD_OUTPUT_PATH = "bad_output_path"
    UNKNOWN_PROFILE = "unknown_profile"
    MODE_UNAVAILABLE = "mode_unavailable"
    INSUFFICIENT_MEMORY = "insufficient_memory"
    MODEL_LOAD_ERROR = "model_load_error"
    JOB_NOT_FOUND = "job_not_found"
    JOB_CONFLICT = "job_conflict"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    GENERATION_ERROR = "generation_error"
    WORKER_LOST = "worker_lost"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    OUT_OF_MEMORY = "out_of_memory"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_FULL = "store_full"
    SHUTDOWN_REQUESTED = "shutdown_requested"
