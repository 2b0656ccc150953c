"""Ctrl-C that is never lost.  Python raises KeyboardInterrupt in whatever Python code runs when
the signal is handled; when that is a finalizer (``__del__``, run by the garbage collector in the
middle of a page of a big submit) the exception is printed as "Exception ignored" and dropped, and
the command would run on to its end.  While a command runs under :func:`catching`, SIGINT also
sets a flag that the long loops look at between steps (:func:`check`), so the interrupt takes
effect at the next page at the latest."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_pending = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _pending.set()
    raise KeyboardInterrupt


@contextmanager
def catching() -> Iterator[None]:
    """Run the block with SIGINT recorded as well as raised (the main thread only: elsewhere,
    signals cannot be handled and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending.clear()


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived (and was perhaps swallowed by a finalizer)."""
    if _pending.is_set():
        raise KeyboardInterrupt
