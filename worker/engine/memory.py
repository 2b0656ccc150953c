"""Out of memory: recognising it, and the batch ceiling learnt from it (and probed upward again).

A real allocation failure looks different on every device and library: torch's CPU allocator
raises a plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory: you tried to
allocate N bytes"), CUDA a ``torch.OutOfMemoryError`` ("CUDA out of memory"), cuBLAS and oneDNN
their own messages, Python a ``MemoryError``.  :func:`is_oom` knows them all, so the scheduler
halves the batch instead of treating the chunk as failed.

:class:`BatchCeiling` holds what was learnt.  The rule:

* an out-of-memory error with ``r`` rows (``r > 1``) sets the ceiling to ``ceil(r / 2)``;
* a micro-batch that ran at the ceiling (``rows == ceiling``) without error is *clean*; after
  ``wait`` clean micro-batches in a row (:data:`PROBE_AFTER` at first) the ceiling doubles, up to
  the configured maximum, where it is lifted (a *probe*: memory freed elsewhere, or the batch that
  failed held unusually long rows);
* a probe that runs out of memory again (an error with more rows than the ceiling it started
  from) halves back and doubles ``wait`` (up to :data:`PROBE_WAIT_MAX`), so a ceiling that really
  is the limit is retried ever more rarely instead of thrashing; a probe that passes leaves
  ``wait`` as it is.
"""

from __future__ import annotations

import torch

from worker.core.errors import OutOfMemory

PROBE_AFTER = 8
"""Clean micro-batches at a learnt ceiling before the ceiling is probed upward (doubled)."""
PROBE_WAIT_MAX = 1024
"""The longest wait, in clean micro-batches, between probes after probes kept failing."""

_OOM_MESSAGES = (
    "out of memory",  # CUDA: "CUDA out of memory", "CUDA error: out of memory"; HIP, MPS, XPU
    "can't allocate memory",  # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory"
    "cannot allocate memory",  # strerror(ENOMEM), in torch's and oneDNN's messages
    "std::bad_alloc",  # C++ allocation failures surfaced as RuntimeError
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its workspace
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means a device (CPU RAM included) ran out of memory."""
    if isinstance(exc, MemoryError | OutOfMemory):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(m in message for m in _OOM_MESSAGES)


def release_cached(device: torch.device) -> None:
    """Give cached blocks back to the allocator after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class BatchCeiling:
    """The most rows known to fit, learnt from out-of-memory errors (see the module's rule)."""

    def __init__(self) -> None:
        self.ceiling: int | None = None
        """The learnt limit on rows decoded together; None: nothing learnt (or lifted again)."""
        self.wait = PROBE_AFTER
        """Clean micro-batches at the ceiling before the next probe."""
        self.clean = 0
        self.probe_from: int | None = None
        """While a probe is in flight: the ceiling it raised (known to fit)."""

    def limit(self, maximum: int) -> int:
        return maximum if self.ceiling is None else min(maximum, self.ceiling)

    def failed(self, rows: int) -> bool:
        """An out-of-memory error with ``rows`` rows; True if the ceiling came down (one row at a
        time has nothing to halve)."""
        if rows <= 1:
            return False
        if self.probe_from is not None and rows > self.probe_from:
            self.wait = min(self.wait * 2, PROBE_WAIT_MAX)
        half = (rows + 1) // 2
        self.ceiling = half if self.ceiling is None else min(self.ceiling, half)
        self.probe_from = None
        self.clean = 0
        return True

    def succeeded(self, rows: int, maximum: int) -> int | None:
        """A micro-batch of ``rows`` rows finished; returns the new ceiling when this starts a
        probe (``maximum`` or more lifts the ceiling: 0 is returned then), else None."""
        if self.probe_from is not None and rows > self.probe_from:
            self.probe_from = None  # the probe passed
        if self.ceiling is None or rows < min(self.ceiling, maximum):
            return None  # nothing learnt, or a batch the ceiling did not bind: says nothing
        self.clean += 1
        if self.clean < self.wait:
            return None
        self.clean = 0
        self.probe_from = rows
        raised = rows * 2
        self.ceiling = None if raised >= maximum else raised
        return self.ceiling or 0
