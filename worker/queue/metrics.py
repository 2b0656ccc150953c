"""A worker process's Prometheus metrics: ``genq-worker start --metrics-port PORT`` serves them on
``http://HOST:PORT/metrics`` (prometheus_client's HTTP server, a thread of the worker process).

The numbers come from the hooks of :mod:`worker.core.observe`, called where each fact is known:
items and tokens from the store's record script (first writes only, so an item skipped because it
was done, or a result that lost first-write-wins to another worker, is never counted twice — the
``ok`` items of all workers add up to the store's ``succeeded``), deliveries from the store's
attempt counter, micro-batches and out-of-memory back-offs from the engine.  Gauges that describe
the worker (batch size in use, model load time, GPU memory) are read when Prometheus scrapes.

One process, one set of metrics: ``--metrics-port`` needs the solo pool (``--concurrency 1``, the
default).  Run one worker process per port (compose: one replica per container) instead of a
prefork pool; ``genq-worker start`` refuses the combination with a message saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from worker.core.logs import get_logger
from worker.core.observe import Observer, adapter_label, set_observer, status_label
from worker.core.schema import ItemResult

if TYPE_CHECKING:
    from worker.runtime import Runtime

ITEM_LABELS = ("profile", "mode", "adapter", "status")

ITEMS = Counter(
    "genq_items",
    "Item results this worker wrote first (status: ok, or the error type); the ok items of all "
    "workers add up to the store's succeeded count",
    ITEM_LABELS,
)
TOKENS = Counter(
    "genq_tokens",
    "Tokens of the item results this worker wrote first (kind: prompt or completion)",
    ("profile", "mode", "adapter", "kind"),
)
CHUNK_SECONDS = Histogram(
    "genq_chunk_seconds",
    "Seconds per chunk delivery that generated (outcome: done, cancelled)",
    ("outcome",),
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
BATCH_SECONDS = Histogram(
    "genq_batch_seconds",
    "Seconds per micro-batch that ran to the end (out-of-memory attempts not included)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
BATCH_ROWS = Histogram(
    "genq_batch_rows",
    "Rows decoded together per micro-batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
OOM_BACKOFFS = Counter(
    "genq_oom_backoffs", "Out-of-memory errors that halved the micro-batch or isolated an item"
)
WASTED_TOKENS = Counter(
    "genq_wasted_tokens",
    "Completion tokens generated for results the store did not keep (work done twice)",
)
LOST_ITEMS = Counter(
    "genq_lost_items_published",
    "Pending items whose chunk message was lost (no queue, backlog or unacked entry held it) that "
    "this worker published again",
)
DELIVERIES = Counter(
    "genq_deliveries",
    "Chunk deliveries started (redelivered: the store had seen this chunk before)",
    ("redelivered",),
)
ATTEMPTS = Histogram(
    "genq_delivery_attempts",
    "The store's attempt number of each chunk delivery (1 = first delivery)",
    buckets=(1, 2, 3, 4, 5, 10),
)
MODEL_LOAD_SECONDS = Gauge("genq_model_load_seconds", "Seconds this worker took to load its model")
BATCH_SIZE = Gauge(
    "genq_batch_size", "Most rows decoded together now (the configured size, or less after OOM)"
)
GPU_MEMORY = Gauge(
    "genq_gpu_memory_bytes", "GPU memory held by this worker's torch (kind: allocated, reserved)", ("kind",)
)
WORKER_INFO = Gauge(
    "genq_worker_info",
    "1 per worker process: its name, profile, mode and device",
    ("worker", "profile", "mode", "device"),
)

METRICS: tuple[MetricWrapperBase, ...] = (
    ITEMS,
    TOKENS,
    CHUNK_SECONDS,
    BATCH_SECONDS,
    BATCH_ROWS,
    OOM_BACKOFFS,
    WASTED_TOKENS,
    DELIVERIES,
    ATTEMPTS,
    MODEL_LOAD_SECONDS,
    BATCH_SIZE,
    GPU_MEMORY,
    WORKER_INFO,
)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def sample_names(metrics: Sequence[MetricWrapperBase] = METRICS) -> set[str]:
    """Every series name the worker can expose (``genq_items_total``, ``genq_batch_seconds_bucket``,
    ...): what a dashboard or alert may query."""
    names: set[str] = set()
    for metric in metrics:
        name, kind = metric._name, metric._type
        names |= {name + suffix for suffix in _SUFFIXES[str(kind)]}
    return names


class PrometheusObserver(Observer):
    """The hooks of :mod:`worker.core.observe` as Prometheus metrics."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self.log = get_logger()

    def _labels(self, result: ItemResult) -> tuple[str, str, str]:
        runtime = self.runtime
        profile = result.profile or (runtime.profile_name if runtime else None) or "unknown"
        mode = result.mode or (runtime.mode if runtime else None) or "unknown"
        loaded = runtime.profile if runtime else None
        if loaded is None:
            return str(profile), str(mode), adapter_label(result)
        adapter = adapter_label(result, loaded.named_adapters, loaded.default_adapter_name)
        return str(profile), str(mode), adapter

    def recorded(self, job_id: str, results: Sequence[ItemResult], written: Collection[int]) -> None:
        try:
            first = set(written)
            for r in results:
                if r.index not in first:
                    continue  # lost first-write-wins, or the job had ended: the store kept another
                first.discard(r.index)  # the same index twice in one call: the first write only
                profile, mode, adapter = self._labels(r)
                ITEMS.labels(profile, mode, adapter, status_label(r)).inc()
                if r.usage.prompt_tokens:
                    TOKENS.labels(profile, mode, adapter, "prompt").inc(r.usage.prompt_tokens)
                if r.usage.completion_tokens:
                    TOKENS.labels(profile, mode, adapter, "completion").inc(r.usage.completion_tokens)
        except Exception as exc:  # metrics must never break a write
            self.log.warning("metrics_failed", hook="recorded", error=str(exc)[:200])

    def delivery(self, job_id: str, attempt: int) -> None:
        DELIVERIES.labels("true" if attempt > 1 else "false").inc()
        ATTEMPTS.observe(attempt)

    def chunk_done(self, outcome: str, seconds: float) -> None:
        CHUNK_SECONDS.labels(str(outcome)).observe(seconds)

    def micro_batch(self, rows: int, items: int, seconds: float) -> None:
        BATCH_SECONDS.observe(seconds)
        BATCH_ROWS.observe(rows)

    def oom_backoff(self, rows: int) -> None:
        OOM_BACKOFFS.inc()

    def wasted(self, tokens: int) -> None:
        WASTED_TOKENS.inc(tokens)

    def lost_published(self, items: int) -> None:
        LOST_ITEMS.inc(items)


def _reader(fn: Callable[[], float]) -> Callable[[], float]:
    """``fn`` for a gauge read at scrape time: 0 instead of an exception."""

    def read() -> float:
        try:
            return float(fn())
        except Exception:
            return 0.0

    return read


def serve(port: int, runtime: Runtime, addr: str = "0.0.0.0") -> Any:
    """Install the Prometheus hooks and serve ``/metrics`` on ``addr:port`` (a daemon thread).
    Before the model loads, so a scrape answers while it does."""
    set_observer(PrometheusObserver(runtime))

    def batch_size() -> float:
        engine = runtime.engine
        limit = getattr(engine, "batch_limit", None)
        return float(limit()) if callable(limit) else 0.0

    BATCH_SIZE.set_function(_reader(batch_size))
    MODEL_LOAD_SECONDS.set_function(_reader(lambda: runtime.load_seconds or 0.0))
    server, _thread = start_http_server(port, addr=addr)
    return server


def loaded(runtime: Runtime) -> None:
    """Once the model is loaded: who this worker is, and GPU memory when it runs on CUDA."""
    info = runtime.info()
    WORKER_INFO.labels(runtime.name, str(info["profile"]), str(info["mode"]), str(info["device"])).set(1)
    if info["device"] == "cuda":
        import torch  # only here, and only on a CUDA worker

        GPU_MEMORY.labels("allocated").set_function(_reader(torch.cuda.memory_allocated))
        GPU_MEMORY.labels("reserved").set_function(_reader(torch.cuda.memory_reserved))
