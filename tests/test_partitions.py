"""Network faults between machines (issue 11, point 3), on Linux network namespaces.

Redis, two workers and the producer each run in a namespace of their own with their own address
on one switch (:mod:`tests.netns`); worker ``w1``'s link goes through a user-space relay that can
add latency and loss (:mod:`tests.netem`).  The workers decode one row at a time and sleep 0.5 s
per micro-batch of 4 (chunks of 5 items last about 1.1 s), with ``GENQ_VISIBILITY_TIMEOUT=6``.
The test reads Redis through its Unix socket, outside the network it breaks.

Faults, each on a job of 60 items:

* a clean job first: the time the others are compared with;
* ``w1`` cut off (its ``eth0`` down) for 2 × the visibility timeout in the middle of a chunk, then
  reconnected: ``w2`` takes the chunk back, ``w1`` carries on once it is back;
* Redis cut off from everyone for 30 s while a producer (`genq run` with a broker) follows the job;
* 100 ms each way (200 ms round trip) and 5 % loss each way on ``w1``'s link for the whole job.

Each ends with every item exactly once, in order (collected by the producer), no attempt counted
twice for one delivery (the store's attempts against Celery's own ``received`` lines), every
stored result the first write of its item (the workers' events), and each cut-off worker (the same
process) writing results after the fault: of the job, or, when the others finished it first, of
a small job submitted afterwards.  Each prints one line of figures
(``pytest -s -k partitions``); docs/RELIABILITY.md has them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cluster import final_status, in_flight, job_counts, log_events, run_genq
from tests.helpers import (
    REPO,
    RedisServer,
    WorkerProcess,
    env_for,
    one_row_profile,
    rows,
    wait_for,
    write_prompts,
)
from tests.ledger import Ledger, deliveries
from tests.netns import Network, unavailable
from worker.chunks import chunk_number, chunk_range
from worker.core.schema import ItemResult

PROFILE = "tiny-rows1"
VISIBILITY = 6
ITEMS = 60
CHUNK = 5
WORKERS = ("w1", "w2")


@dataclass
class Lab:
    net: Network
    server: RedisServer
    configs: Path
    folder: Path
    workers: dict[str, WorkerProcess]
    clean_seconds: list[float] = field(default_factory=list)

    @property
    def r(self) -> redis.Redis:
        return self.server.client()

    def genq(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``genq ARGS`` on the producer's machine."""
        env = {"GENQ_CONFIGS_DIR": str(self.configs)}
        return run_genq(self.server.url, *args, env=env, prefix=self.net.prefix("producer"))

    def logs(self) -> list[Path]:
        return [w.log_path for w in self.workers.values()]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = unavailable()
    if reason:
        pytest.skip(f"network namespaces cannot be used here: {reason}")
    folder = tmp_path_factory.mktemp("net")
    net = Network(folder, ["redis", *WORKERS, "producer"], relayed=frozenset({"w1"})).create()
    server = RedisServer(folder / "redis", host=net.address("redis"), prefix=net.prefix("redis"))
    workers: dict[str, WorkerProcess] = {}
    try:
        server.start()
        configs = one_row_profile(folder, PROFILE)
        env = {
            "GENQ_CONFIGS_DIR": str(configs),
            "GENQ_VISIBILITY_TIMEOUT": str(VISIBILITY),
            "GENQ_FAULT_SLOW_MS": "500",
            "GENQ_MAX_ATTEMPTS": "10",
        }
        for name in WORKERS:
            workers[name] = WorkerProcess(
                server.url,
                folder / f"{name}.log",
                profile=PROFILE,
                name=name,
                env=env,
                prefix=net.prefix(name),
                observe_url=server.local_url,
            ).start(wait=False)
        for w in workers.values():
            w.wait_ready()
        yield Lab(net, server, configs, folder, workers)
    finally:
        for w in workers.values():
            w.stop()
        server.stop()
        net.close()


def submit(lab: Lab, tmp_path: Path, job: str, items: int = ITEMS) -> str:
    """A job of its own id (the same prompts under a derived id would resume the last job)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(tmp_path / "in.jsonl", items, max_new_tokens=6)
    args = ["submit", str(prompts), "--profile", PROFILE, "--chunk-size", str(CHUNK), "--job-id", job]
    return lab.genq(*args).stdout.split()[-1]


def wait_final(lab: Lab, job: str, timeout: float = 240) -> None:
    assert wait_for(lambda: final_status(lab.r, job), timeout=timeout, what=f"{job} final") == "completed"


def settle(lab: Lab, job: str) -> None:
    """Until every delivery of the job has returned and nothing of it is left to come back."""

    def settled() -> bool:
        received = sum(deliveries(lab.logs(), job).values())
        returned = sum(deliveries(lab.logs(), job, "returned").values())
        return returned >= received and lab.r.hlen("unacked") == 0

    wait_for(settled, timeout=60, interval=0.5, what="every delivery of the job to return")


def stored(lab: Lab, job: str) -> dict[int, ItemResult]:
    raw = lab.r.hgetall(f"genq:job:{job}:results")
    return {int(i): ItemResult.model_validate_json(v) for i, v in raw.items()}


def exactly_once(lab: Lab, job: str, got: list[dict[str, Any]]) -> dict[str, Any]:
    """Every item once, in order, ok; counts and tokens exact; each stored result the first write
    of its item; no delivery counted as two attempts.  Returns the figures of the run."""
    assert [row["id"] for row in got] == [f"p{i:04d}" for i in range(ITEMS)]
    assert all(row["status"] == "ok" for row in got)
    counts = job_counts(lab.r, job)
    assert (counts["status"], counts["succeeded"], counts["errored"]) == ("completed", ITEMS, 0)
    results = stored(lab, job)
    tokens = sum(x.usage.completion_tokens for x in results.values())
    assert int(lab.r.hget(f"genq:job:{job}", "completion_tokens") or 0) == tokens
    settle(lab, job)
    ledger = Ledger.from_logs(lab.logs(), job)
    writers = ledger.writers()
    assert sorted(writers) == list(range(ITEMS)) and ledger.duplicates == 0
    wrong = ledger.not_first(results)
    assert not wrong, f"stored results that are not the first write (stored vs first): {wrong}"
    attempts = {str(k): int(v) for k, v in lab.r.hgetall(f"genq:job:{job}:attempts").items()}
    handed = deliveries(lab.logs(), job)
    assert all(n <= handed[c] for c, n in attempts.items()), (attempts, handed)
    assert all(w.alive() and w.starts == 1 for w in lab.workers.values())
    return {
        "extra_deliveries": sum(handed.values()) - len(handed),
        "max_attempts": max(attempts.values()),
        **{k: v for k, v in ledger.summary(tokens).items() if k != "writes"},
    }


def collect(lab: Lab, job: str, out: Path) -> list[dict[str, Any]]:
    lab.genq("collect", job, "-o", str(out))
    return rows(out)


def wrote_after(lab: Lab, job: str, worker: str, wall: float) -> int:
    """Items ``worker`` generated (written or dropped) for ``job`` after ``wall`` (time.time())."""
    since = datetime.fromtimestamp(wall, UTC)
    writes = Ledger.from_logs([lab.workers[worker].log_path], job).writes
    return sum(len(w.written) + len(w.dropped) for w in writes if w.at > since)


def items_by(r: redis.Redis, job: str, workers: tuple[str, ...]) -> dict[str, int]:
    """Results of ``job`` each worker has written (the store's per-worker counters)."""
    return {w: int(r.hget(f"genq:job:{job}:workers", f"{w}:items") or 0) for w in workers}


def back_after(lab: Lab, job: str, before: dict[str, int], up_at: float, tmp_path: Path) -> dict[str, float]:
    """Seconds from ``up_at`` until each worker of ``before`` writes a new result: of ``job``
    (beyond its count in ``before``), else, once ``job`` has ended, of a small job submitted
    then."""
    r = lab.r
    workers = tuple(before)
    back: dict[str, float] = {}

    def watch(key: str, base: dict[str, int]) -> None:
        for w in workers:
            if w not in back and int(r.hget(key, f"{w}:items") or 0) > base[w]:
                back[w] = time.monotonic() - up_at

    while not final_status(r, job) and len(back) < len(workers):
        watch(f"genq:job:{job}:workers", before)
        time.sleep(0.05)
    if len(back) < len(workers):
        later = submit(lab, tmp_path / "later", f"{job}-later", 20)
        deadline = time.monotonic() + 120
        while len(back) < len(workers) and time.monotonic() < deadline:
            watch(f"genq:job:{later}:workers", dict.fromkeys(workers, 0))
            time.sleep(0.05)
        wait_final(lab, later)
    assert len(back) == len(workers), f"not writing again after the fault: {set(workers) - set(back)}"
    return {w: round(t, 1) for w, t in back.items()}


def report(name: str, lab: Lab, seconds: float, **figures: Any) -> None:
    clean = lab.clean_seconds[0] if lab.clean_seconds else None
    extra = {"clean_s": round(clean, 1), "cost_s": round(seconds - clean, 1)} if clean else {}
    print(f"\n{name} " + json.dumps({"job_s": round(seconds, 1), **extra, **figures}))


def test_a_clean_job_across_the_network(lab: Lab, tmp_path: Path) -> None:
    """The yardstick: the same job with nothing broken, both workers taking part."""
    started = time.monotonic()
    job = submit(lab, tmp_path, "net-clean")
    wait_final(lab, job)
    seconds = time.monotonic() - started
    figures = exactly_once(lab, job, collect(lab, job, tmp_path / "out.jsonl"))
    assert all(wrote_after(lab, job, w, 0) > 0 for w in WORKERS)
    lab.clean_seconds.append(seconds)
    report("NET-CLEAN", lab, seconds, **figures)


def test_a_worker_cut_off_mid_chunk_for_twice_the_visibility_timeout(lab: Lab, tmp_path: Path) -> None:
    """``w1``'s cable is pulled while it has unwritten items of a chunk, for 2 × the visibility
    timeout.  ``w2`` gets the chunk back and writes its items; plugged back in, the same ``w1``
    process carries on and writes results of the job again."""
    r = lab.r
    started = time.monotonic()
    job = submit(lab, tmp_path, "net-worker-cut")

    def w1_mid_chunk() -> str | None:
        busy = in_flight(r, job, worker="w1", since=lab.workers["w1"].spawned_at)
        return next((c for c, left in busy.items() if left > 0), None)

    chunk = wait_for(w1_mid_chunk, timeout=60, interval=0.01, what="w1 mid-chunk")
    lab.net.link("w1", up=False)
    cut_at = time.monotonic()
    n = chunk_number(chunk)
    assert n is not None
    held = [str(i) for i in chunk_range(n, ITEMS, CHUNK)]
    left = [i for i, v in zip(held, r.hmget(f"genq:job:{job}:results", held), strict=True) if v is None]
    peer_took: float | None = None
    while time.monotonic() < cut_at + 2 * VISIBILITY:
        if peer_took is None and any(
            v is not None and json.loads(v)["worker"] == "w2"
            for v in r.hmget(f"genq:job:{job}:results", left)
        ):
            peer_took = time.monotonic() - cut_at
        time.sleep(0.05)
    before = items_by(r, job, ("w1",))
    lab.net.link("w1", up=True)
    up_at = time.monotonic()
    back = back_after(lab, job, before, up_at, tmp_path)
    wait_final(lab, job)
    seconds = time.monotonic() - started
    # the store says who wrote the items w1 held (the time is known when it was during the cut)
    taken = [i for i in left if stored(lab, job)[int(i)].worker == "w2"]
    assert taken, "w2 never took the chunk w1 held while w1 was cut off"
    figures = exactly_once(lab, job, collect(lab, job, tmp_path / "out.jsonl"))
    report(
        "NET-WORKER-CUT",
        lab,
        seconds,
        cut_s=2 * VISIBILITY,
        items_unwritten_at_cut=len(left),
        chunk_taken_by_peer_after_s=round(peer_took, 1) if peer_took is not None else None,
        w1_writing_again_after_s=back["w1"],
        **figures,
    )


def test_redis_cut_off_from_everyone_for_30_seconds(lab: Lab, tmp_path: Path) -> None:
    """Redis' cable is pulled for 30 s while both workers run the job and a producer (`genq run`
    with a broker, on its own machine) follows it.  Nothing is written meanwhile; afterwards the
    same processes carry on: the producer writes every row once, in order, and both workers
    write results again."""
    r = lab.r
    prompts = write_prompts(tmp_path / "in.jsonl", ITEMS, max_new_tokens=6)
    out = tmp_path / "out.jsonl"
    job = "net-redis-cut"
    args = ["run", str(prompts), "-o", str(out), "--profile", PROFILE, "--chunk-size", str(CHUNK)]
    started = time.monotonic()
    producer = subprocess.Popen(
        [*lab.net.prefix("producer"), sys.executable, "-m", "producer.cli", *args, "--job-id", job],
        cwd=REPO,
        env=env_for(lab.server.url, GENQ_CONFIGS_DIR=str(lab.configs)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: int(job_counts(r, job)["succeeded"]) >= 20, timeout=120, what="progress")
        lab.net.link("redis", up=False)
        cut_at = time.monotonic()
        frozen = int(job_counts(r, job)["succeeded"])
        before = items_by(r, job, WORKERS)
        while time.monotonic() < cut_at + 30:
            assert int(job_counts(r, job)["succeeded"]) == frozen, "a result was written through a cut"
            time.sleep(0.2)
        lab.net.link("redis", up=True)
        up_at = time.monotonic()
        resumed = wait_for(
            lambda: time.monotonic() - up_at if int(job_counts(r, job)["succeeded"]) > frozen else None,
            timeout=120,
            interval=0.05,
            what="the first result after the cut",
        )
        back = back_after(lab, job, before, up_at, tmp_path)
        _, err = producer.communicate(timeout=240)
        assert producer.returncode == 0, err[-3000:]
    finally:
        if producer.poll() is None:
            producer.kill()
    seconds = time.monotonic() - started
    assert frozen < ITEMS
    figures = exactly_once(lab, job, rows(out))
    report(
        "NET-REDIS-CUT",
        lab,
        seconds,
        cut_s=30,
        done_at_cut=frozen,
        first_result_after_s=round(resumed, 1),
        writing_again_after_s=back,
        **figures,
    )


def test_latency_and_loss_on_one_workers_link_for_a_whole_job(lab: Lab, tmp_path: Path) -> None:
    """100 ms each way and 5 % of frames lost each way on ``w1``'s link for the whole job: the
    job completes exactly once and ``w1`` does part of it, only slower."""
    lab.net.impair("w1", delay=0.1, loss=0.05)
    try:
        started = time.monotonic()
        job = submit(lab, tmp_path, "net-latency")
        wait_final(lab, job)
        seconds = time.monotonic() - started
    finally:
        lab.net.impair("w1")
    figures = exactly_once(lab, job, collect(lab, job, tmp_path / "out.jsonl"))
    done = {
        w: [float(str(e["seconds"])) for e in log_events(lab.workers[w].log_path, "chunk_done", job=job)]
        for w in WORKERS
    }
    assert done["w1"] and wrote_after(lab, job, "w1", 0) > 0
    report(
        "NET-LATENCY-LOSS",
        lab,
        seconds,
        delay_ms_each_way=100,
        loss_each_way=0.05,
        chunks_by_worker={w: len(v) for w, v in done.items()},
        chunk_s_median={w: round(statistics.median(v), 2) for w, v in done.items() if v},
        **figures,
    )
