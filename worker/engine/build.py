"""The engine a worker runs, set up the way a worker needs it."""

from __future__ import annotations

from worker.core.settings import Settings, get_settings
from worker.engine.cpu import prepare_cpu
from worker.engine.faults import FaultyEngine, faults_enabled
from worker.engine.scheduler import Engine
from worker.model.loading import Loaded


def build_engine(
    loaded: Loaded,
    *,
    settings: Settings | None = None,
    autotune: bool = True,
    max_batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    worker: str | None = None,
    ignore_eos: bool = False,
) -> Engine:
    """The engine a worker runs.  On the CPU, torch's thread count and packed linear weights first
    (:func:`worker.engine.cpu.prepare_cpu`); a :class:`FaultyEngine` only when a ``GENQ_FAULT_*``
    setting is on; the batch size measured by :meth:`Engine.autotune` (once per machine, then
    cached) when the profile says ``auto`` and neither ``max_batch_size`` nor ``autotune=False``
    says otherwise."""
    settings = settings or get_settings()
    if loaded.device != "cuda":
        prepare_cpu(loaded.model, settings)
    cls = FaultyEngine if faults_enabled(settings) else Engine
    engine = cls(
        loaded,
        settings=settings,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        worker=worker,
        ignore_eos=ignore_eos,
    )
    if autotune and max_batch_size is None and loaded.profile.engine.max_batch_size == "auto":
        engine.autotune()
    return engine
