"""The one error hierarchy of genq (no torch import).

Two branches, and the branch decides what happens:

* :class:`PermanentError` — retrying cannot help (bad input, unknown profile, a prompt longer
  than the context).  Item-level ones become the ``error`` object of that item's result; job-level
  ones refuse the job or stop the worker with a message naming what to fix.
* :class:`TransientError` — the same call may succeed later (lost connection, out of memory).
  They are retried; an item only records one when retrying is exhausted.

Every error has a stable ``code`` (snake_case), which is what results carry as ``error.type``.
"""

from __future__ import annotations

from worker.core.states import ErrorCode


class GenqError(Exception):
    """Base of every error genq raises on purpose."""

    code: ErrorCode = ErrorCode.GENQ_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"type": self.code, "message": self.message}


class PermanentError(GenqError):
    """Retrying will not help."""

    code = ErrorCode.PERMANENT_ERROR


class TransientError(GenqError):
    """May succeed if tried again."""

    code = ErrorCode.TRANSIENT_ERROR


# --- input and configuration -------------------------------------------------------------


class InputError(PermanentError):
    """A bad input line or file.  Names the line (1-based) and the field where known."""

    code = ErrorCode.INVALID_INPUT

    def __init__(
        self, message: str, *, line: int | None = None, field: str | None = None, source: str | None = None
    ) -> None:
        self.line = line
        self.field = field
        self.source = source
        where = []
        if source:
            where.append(source)
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.detail = message


class OutputPathError(PermanentError):
    """An output path that cannot be written (a directory, a missing folder, no permission, or
    the input file itself).  Refused before any work is done."""

    code = ErrorCode.BAD_OUTPUT_PATH


class ConfigError(PermanentError):
    """A bad setting, environment variable or profile file."""

    code = ErrorCode.CONFIG_ERROR


class CredentialsRefused(ConfigError):
    """Redis refused the credentials in the broker URL (retrying cannot help)."""


class ProfileNotFound(ConfigError):
    code = ErrorCode.UNKNOWN_PROFILE


class ModeError(PermanentError):
    """An explicit mode the hardware cannot run, or an unknown mode."""

    code = ErrorCode.MODE_UNAVAILABLE


class InsufficientMemory(PermanentError):
    """The model fits in no mode on this machine.  The message names the numbers."""

    code = ErrorCode.INSUFFICIENT_MEMORY


class ModelLoadError(PermanentError):
    """The model or adapter cannot be loaded (gated, missing, offline without cache, unsafe)."""

    code = ErrorCode.MODEL_LOAD_ERROR


class JobNotFound(PermanentError):
    code = ErrorCode.JOB_NOT_FOUND


class JobConflict(PermanentError):
    """Re-submitting a job id with different inputs or settings."""

    code = ErrorCode.JOB_CONFLICT


class JobRefused(JobConflict):
    """An operation the job's state table (:mod:`worker.core.lifecycle`) does not allow from the
    job's current state: nothing changed.  The message is the table's one line."""

    def __init__(self, message: str, *, state: str, event: str) -> None:
        super().__init__(message)
        self.state = state
        self.event = event


# --- item-level outcomes -------------------------------------------------------------------


class ContextLengthExceeded(PermanentError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class GenerationError(PermanentError):
    code = ErrorCode.GENERATION_ERROR


class WorkerLost(PermanentError):
    """The item kept killing the worker processes that took it."""

    code = ErrorCode.WORKER_LOST


class Cancelled(PermanentError):
    code = ErrorCode.CANCELLED


class Expired(PermanentError):
    code = ErrorCode.EXPIRED


# --- transient -----------------------------------------------------------------------------


class OutOfMemory(TransientError):
    """CUDA OOM or MemoryError; the engine halves the micro-batch and retries."""

    code = ErrorCode.OUT_OF_MEMORY


class StoreUnavailable(TransientError):
    """Redis could not be reached (after the client's own retries)."""

    code = ErrorCode.STORE_UNAVAILABLE


class StoreFull(StoreUnavailable):
    """Redis reached its ``maxmemory``: writes are refused until space is freed."""

    code = ErrorCode.STORE_FULL


class ShutdownRequested(TransientError):
    """The worker was asked to stop; the unfinished part of the chunk is handed back."""

    code = ErrorCode.SHUTDOWN_REQUESTED
