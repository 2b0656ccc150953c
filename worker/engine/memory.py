"""Recognising out-of-memory errors."""

from __future__ import annotations

import torch

from worker.core.errors import OutOfMemory


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory."""
    if isinstance(exc, MemoryError | OutOfMemory):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached(device: torch.device) -> None:
    """Give cached blocks back to the allocator after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
