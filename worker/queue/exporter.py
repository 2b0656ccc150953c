"""The cluster's state as Prometheus metrics, read from Redis at each scrape: ``genq metrics --port``.

Why a separate exporter and not the workers: queue depth and job counts are facts about Redis,
not about one worker.  Every worker would report the same numbers (summed by a dashboard, they
would be N times too big), and with no worker running — exactly when a queue grows — nobody
would report them at all.  One small process (``genq metrics``, no model, no torch) reads them
when Prometheus asks; run one per Redis.

Series (all gauges, read fresh at each scrape):

* ``genq_store_up``: 1 when Redis answered this scrape, else 0 (and nothing else is reported);
* ``genq_queue_depth{queue}``: chunk messages waiting in each ``genq.*`` queue (kombu's Redis
  list; priority sub-lists are added to their queue), ``genq_queue_backlog{queue}``: chunk
  messages still in the backlogs of the queue's jobs (the dispatcher moves them to the queue a few
  at a time, round robin: the queue's own depth stays small, so this is the figure that shows work
  waiting), ``genq_chunks_unacked``: delivered to a
  worker and not yet acknowledged (in flight, or held by a dead worker until redelivery);
* ``genq_jobs{status}``: jobs in the index by status (``partial``/``stale`` as `genq status`
  shows them for the newest ``max_jobs``; the rest by their stored status);
* per job, for the newest ``max_jobs`` jobs: ``genq_job_items{job,profile,count}`` (total,
  succeeded, errored, cancelled, expired, pending), ``genq_job_completion_tokens``,
  ``genq_job_wasted_tokens``,
  ``genq_job_tokens_per_second``, ``genq_job_eta_seconds`` (only while it can be estimated) —
  the same figures as ``genq status JOB`` (:class:`worker.core.jobstate.JobState`);
* ``genq_workers{profile,mode,device}``: live workers (fresh heartbeats);
* ``genq_redis_used_memory_bytes``, ``genq_redis_max_memory_bytes`` (0: no limit): Redis refuses
  every write at its maxmemory, and work stops until it has room (the shipped alert fires first).

When Redis does not answer, a scrape has ``genq_store_up 0`` and no other series: never a 0 that
would read as "nothing queued" or "no jobs".
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.core.logs import get_logger
from worker.store.dispatch import ring_entry
from worker.store.keys import JOBS_INDEX, backlog_key, job_key, ring_key
from worker.store.memory import redis_memory

if TYPE_CHECKING:
    from worker.store import RedisStore

QUEUE_PATTERN = "genq.*"
"""kombu's Redis transport keeps queue ``Q`` as the list ``Q`` (``genq.<profile>.<mode>``)."""
PRIORITY_SEP = "\x06\x16"
"""kombu's separator between a queue's name and its priority step (``Q\\x06\\x163``)."""
BINDINGS = "_kombu.binding."
"""kombu's set of the queues bound to an exchange (genq's exchanges are named after their queue)."""
UNACKED = "unacked"
"""kombu's hash of delivered, unacknowledged messages."""

JOB = ("job", "profile")
EXPORTER_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "genq_store_up": ("1 when Redis answered this scrape, else 0", ()),
    "genq_queue_depth": ("Chunk messages waiting in the queue", ("queue",)),
    "genq_queue_backlog": ("Chunk messages in the backlogs of the queue's jobs, not yet on it", ("queue",)),
    "genq_chunks_unacked": ("Chunk messages delivered to a worker and not yet acknowledged", ()),
    "genq_jobs": ("Jobs in the job index by status", ("status",)),
    "genq_job_items": ("Items of a job by count (total, succeeded, errored, ..., pending)", (*JOB, "count")),
    "genq_job_completion_tokens": ("Completion tokens a job has generated", JOB),
    "genq_job_wasted_tokens": ("Completion tokens generated for a job's items and not kept", JOB),
    "genq_job_tokens_per_second": ("A job's completion tokens per second since it started", JOB),
    "genq_job_eta_seconds": ("Seconds until a job is done at its rate so far (absent: unknown)", JOB),
    "genq_workers": ("Live workers by profile, mode and device", ("profile", "mode", "device")),
    "genq_redis_used_memory_bytes": ("Redis' used_memory", ()),
    "genq_redis_max_memory_bytes": ("Redis' maxmemory (0: no limit); at it, writes are refused", ()),
}


def sample_names() -> set[str]:
    """Every series name the exporter exposes (all gauges: the name itself)."""
    return set(EXPORTER_METRICS)


def _family(name: str) -> GaugeMetricFamily:
    doc, labels = EXPORTER_METRICS[name]
    return GaugeMetricFamily(name, doc, labels=list(labels))


def queue_depths(r: Any) -> dict[str, int]:
    """Messages waiting per ``genq.*`` queue (priority sub-lists added to their queue).  kombu
    deletes a queue's list when it is empty, so queues known from kombu's bindings
    (``_kombu.binding.<exchange>``: ``routing key SEP pattern SEP queue``) are reported as 0."""
    depths: dict[str, int] = {}
    for key in r.scan_iter(match=BINDINGS + QUEUE_PATTERN, count=1000, _type="set"):
        for member in r.smembers(key):
            queue = str(member).split(PRIORITY_SEP)[-1]
            if queue.startswith(QUEUE_PATTERN[:-1]):
                depths[queue] = 0
    names = [str(k) for k in r.scan_iter(match=QUEUE_PATTERN, count=1000, _type="list")]
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    for name, n in zip(names, pipe.execute() if names else [], strict=True):
        queue = name.split(PRIORITY_SEP)[0]
        depths[queue] = depths.get(queue, 0) + int(n)
    return depths


def queue_backlogs(r: Any) -> dict[str, int]:
    """Messages in the backlogs of each queue's jobs (the jobs in its ring), per queue."""
    rings = [str(k) for k in r.scan_iter(match=ring_key("*"), count=1000, _type="list")]
    pipe = r.pipeline(transaction=False)
    for ring in rings:
        pipe.lrange(ring, 0, -1)
    members = pipe.execute() if rings else []
    pipe = r.pipeline(transaction=False)
    for jobs in members:
        for entry in jobs:
            pipe.llen(backlog_key(ring_entry(str(entry))[0]))
    lengths = iter(pipe.execute() if any(members) else [])
    prefix = len(ring_key(""))
    return {
        ring[prefix:]: sum(int(next(lengths)) for _ in jobs)
        for ring, jobs in zip(rings, members, strict=True)
    }


class StoreCollector(Collector):
    """Reads the store at each scrape (nothing cached: a scrape sees Redis as it is)."""

    def __init__(self, store: RedisStore, *, max_jobs: int = 20) -> None:
        self.store = store
        self.max_jobs = max_jobs
        self.log = get_logger()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name in EXPORTER_METRICS:
            yield _family(name)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = _family("genq_store_up")
        try:
            found = list(self._collect())
        except Exception as exc:  # Redis down or restarting: say so, keep serving
            self.log.warning("metrics_store_unavailable", error=str(exc)[:200])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from found

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        r = self.store.r
        depth = _family("genq_queue_depth")
        for queue, n in sorted(queue_depths(r).items()):
            depth.add_metric([queue], n)
        backlog = _family("genq_queue_backlog")
        for queue, n in sorted(queue_backlogs(r).items()):
            backlog.add_metric([queue], n)
        unacked = _family("genq_chunks_unacked")
        unacked.add_metric([], int(r.hlen(UNACKED)))

        recent = self.store.list_jobs(limit=self.max_jobs)
        shown = {s.spec.job_id: s.label for s in recent}
        ids = [str(j) for j in r.zrange(JOBS_INDEX, 0, -1)]
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        by_status: Tally[str] = Tally()
        for job_id, status in zip(ids, pipe.execute(), strict=True):
            label = shown.get(job_id) or (str(status) if status else None)
            if label:  # None: expired after retention, not yet unindexed
                by_status[label] += 1
        jobs = _family("genq_jobs")
        for status, n in sorted(by_status.items()):
            jobs.add_metric([status], n)

        items, tokens = _family("genq_job_items"), _family("genq_job_completion_tokens")
        rate, eta = _family("genq_job_tokens_per_second"), _family("genq_job_eta_seconds")
        wasted = _family("genq_job_wasted_tokens")
        for state in recent:
            key = [state.spec.job_id, state.spec.profile]
            for count, n in state.counts.as_dict().items():
                items.add_metric([*key, count], n)
            tokens.add_metric(key, state.completion_tokens)
            wasted.add_metric(key, self.store.waste(state.spec.job_id)[0])
            rate.add_metric(key, state.tokens_per_second)
            if state.eta_seconds is not None:
                eta.add_metric(key, state.eta_seconds)

        workers = _family("genq_workers")
        live: Tally[tuple[str, str, str]] = Tally(
            (str(w.get("profile")), str(w.get("mode")), str(w.get("device"))) for w in self.store.workers()
        )
        for labels, n in sorted(live.items()):
            workers.add_metric(list(labels), n)
        memory = redis_memory(r)
        used, limit = _family("genq_redis_used_memory_bytes"), _family("genq_redis_max_memory_bytes")
        used.add_metric([], memory.used)
        limit.add_metric([], memory.max)
        yield from (depth, backlog, unacked, jobs, items, tokens, wasted, rate, eta, workers, used, limit)


def serve(store: RedisStore, port: int, addr: str = "0.0.0.0", *, max_jobs: int = 20) -> Any:
    """Serve the store's metrics on ``addr:port/metrics`` (a daemon thread); returns the server."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, max_jobs=max_jobs))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
