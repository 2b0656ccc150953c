"""Hooks the layers below the worker call when something worth counting happens (no Prometheus).

The store, the chunk runner and the engine call :func:`observer` at the few points where a fact
is known for sure: the store's record script said which results were first writes, a chunk's
delivery started, a micro-batch ran, an out-of-memory error halved the batch.  By default the
observer does nothing (the producer, embedded runs, tests); ``genq-worker start --metrics-port``
installs :class:`worker.queue.metrics.PrometheusObserver`, which turns the calls into Prometheus
metrics.  Keeping the hooks here keeps ``prometheus_client`` out of core, store, chunks and engine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from worker.core.counting import count_field
from worker.core.schema import ItemResult
from worker.core.states import CountField, ItemStatus

DEFAULT_ADAPTER = "default"
"""The ``adapter`` label of an item that names no adapter of its own (the profile's adapter)."""


UNKNOWN_ADAPTER = "unknown"
"""The ``adapter`` label of an error result for an item that named an adapter the profile does
not have (refused by the worker): never a name the profile's adapters do not include."""


def adapter_label(result: ItemResult, adapters: Collection[str] = (), default: str | None = None) -> str:
    """The adapter that answered ``result``, as a metric label: the one place that decides it
    (per-item adapters fill it in here).  ``adapters``: the profile's adapter names; ``default``:
    the one that runs items naming none.  A result naming no adapter (an error result, or a
    profile of one adapter) is labelled with ``default``, one naming an adapter outside
    ``adapters`` with :data:`UNKNOWN_ADAPTER`."""
    name = getattr(result, "adapter", None)
    if name is None:
        return default or DEFAULT_ADAPTER
    if adapters and name not in adapters:
        return UNKNOWN_ADAPTER
    return str(name)


def status_label(result: ItemResult) -> str:
    """``ok`` for what the store counts as succeeded, else the error's type (``invalid_input``,
    ``context_length_exceeded``, ``out_of_memory``, ``worker_lost``, ``cancelled``, ...): the same
    rule (:func:`worker.core.counting.count_field`) the store's counters follow."""
    if count_field(result) == CountField.SUCCEEDED:
        return str(ItemStatus.OK)
    return str(result.error_type or ItemStatus.ERROR)


class Observer:
    """Does nothing; a worker with metrics replaces it (:func:`set_observer`).  A hook must never
    raise into the work it observes: implementations swallow their own errors."""

    def recorded(self, job_id: str, results: Sequence[ItemResult], written: Collection[int]) -> None:
        """``results`` were sent to the store; ``written`` are the indices whose write was the
        first (the others lost first-write-wins, or the job had ended): only those count."""

    def delivery(self, job_id: str, attempt: int) -> None:
        """A chunk delivery started; ``attempt`` is the store's count of deliveries (1 = first)."""

    def chunk_done(self, outcome: str, seconds: float) -> None:
        """A chunk delivery ended with ``outcome`` (:class:`~worker.core.states.ChunkOutcome`)."""

    def micro_batch(self, rows: int, items: int, seconds: float) -> None:
        """A micro-batch of ``items`` ran, ``rows`` of them decoded together, in ``seconds``."""

    def oom_backoff(self, rows: int) -> None:
        """An out-of-memory error with ``rows`` rows: the batch is halved (or the item isolated)."""

    def wasted(self, tokens: int) -> None:
        """``tokens`` were generated for results the store did not keep (another write of those
        items came first: a backup at a job's tail, or a chunk whose lease lapsed)."""

    def lost_published(self, items: int) -> None:
        """``items`` pending items had no message anywhere and were published again
        (:mod:`worker.queue.recovery`)."""


_observer = Observer()


def observer() -> Observer:
    return _observer


def set_observer(new: Observer | None) -> Observer:
    """Install ``new`` (None: the do-nothing one); returns the previous observer."""
    global _observer
    old, _observer = _observer, new or Observer()
    return old
