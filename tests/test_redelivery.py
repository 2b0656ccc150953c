"""Two live workers on one chunk, and redelivery to a running peer (issue 11, points 1 and 2).

Two real ``genq-worker`` processes share one real Redis.  Their profile is the tiny model run one
row at a time (micro-batches of 4 items, each item written as it finishes) and each micro-batch
sleeps 0.5 s after it (``GENQ_FAULT_SLOW_MS``), with ``GENQ_VISIBILITY_TIMEOUT=5`` and workers
that never renew their chunks' leases (``GENQ_FAULT_NO_LEASE_RENEWAL``, what every worker did
before leases): kombu's sweep (every second here, :mod:`worker.queue.redelivery`) and genq's lease
sweep put back an unacknowledged chunk 5-6 s after it was delivered.  (A live worker renews its
lease: tests/test_leases.py shows that its chunk is then never put back.)

* A chunk of 64 items lasts about 9 s, so it is put back while its first worker still runs it
  and the other, idle, takes it: two live workers generate the same items, and first write wins
  must keep exactly one result per item, the first one written.  The workers' own
  ``results_written`` events say which write the store kept (:mod:`tests.ledger`); greedy text is
  the same from both workers, so the stored result's ``worker`` and ``attempts`` tell the writers
  apart.
* Chunks of 5 items last about 1.1 s.  The worker holding one is SIGKILLed; the other, never
  restarted, must have the first result of that chunk within 2 × the visibility timeout + one
  chunk's run time of the kill, timed by this test's clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.cluster import final_status, in_flight, job_counts, log_events
from tests.helpers import RedisServer, WorkerProcess, genq, one_row_profile, rows, wait_for, write_prompts
from tests.ledger import Ledger, deliveries
from worker.chunks import chunk_number, chunk_range
from worker.core.schema import ItemResult

PROFILE = "tiny-rows1"
VISIBILITY = 5
SLOW_MS = 500
SHORT_CHUNK = 5
"""Items per chunk in the kill test: two micro-batches (4 + 1), about 1.1 s, under the timeout."""


@dataclass
class Pair:
    server: RedisServer
    configs: Path
    workers: list[WorkerProcess]

    @property
    def url(self) -> str:
        return self.server.url

    def logs(self) -> list[Path]:
        return [w.log_path for w in self.workers]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("pair")
    configs = one_row_profile(folder, PROFILE)
    server = RedisServer(folder / "redis")
    server.start()
    env = {
        "GENQ_CONFIGS_DIR": str(configs),
        "GENQ_VISIBILITY_TIMEOUT": str(VISIBILITY),
        "GENQ_FAULT_SLOW_MS": str(SLOW_MS),
        "GENQ_MAX_ATTEMPTS": "10",
        "GENQ_FAULT_NO_LEASE_RENEWAL": "1",
        "GENQ_BACKUP": "false",  # two live workers on one chunk by a lapsed lease, not a backup
    }
    workers = [
        WorkerProcess(server.url, folder / f"{name}.log", profile=PROFILE, name=name, env=env)
        for name in ("left", "right")
    ]
    try:
        for w in workers:
            w.start(wait=False)
        for w in workers:
            w.wait_ready()
        yield Pair(server, configs, workers)
    finally:
        for w in workers:
            w.stop()
        server.stop()


def submit(pair: Pair, n: int, chunk_size: int, folder: Path) -> str:
    prompts = write_prompts(folder / "in.jsonl", n, max_new_tokens=6)
    args = ["submit", str(prompts), "--profile", PROFILE, "--chunk-size", str(chunk_size)]
    return genq(pair.url, *args, GENQ_CONFIGS_DIR=str(pair.configs)).stdout.split()[-1]


def stored(r: redis.Redis, job: str) -> dict[int, ItemResult]:
    raw = r.hgetall(f"genq:job:{job}:results")
    return {int(i): ItemResult.model_validate_json(v) for i, v in raw.items()}


def collect_ids(pair: Pair, job: str, out: Path) -> list[str]:
    genq(pair.url, "collect", job, "-o", str(out), GENQ_CONFIGS_DIR=str(pair.configs))
    return [row["id"] for row in rows(out)]


def settle(r: redis.Redis, pair: Pair, job: str, killed: int = 0) -> None:
    """Until every delivery of the job's chunks has returned (but the ``killed`` ones) and none is
    left to come back."""

    def settled() -> bool:
        received = sum(deliveries(pair.logs(), job).values())
        returned = sum(deliveries(pair.logs(), job, "returned").values())
        return returned >= received - killed and r.hlen("unacked") == 0 and r.llen(f"genq.{PROFILE}.any") == 0

    wait_for(settled, timeout=60, interval=0.2, what="every delivery of the job to return")


def assert_attempts_match_deliveries(r: redis.Redis, pair: Pair, job: str) -> dict[str, int]:
    """Each chunk's attempts in the store are at most Celery's deliveries of it: no delivery was
    counted twice."""
    attempts = {str(k): int(v) for k, v in r.hgetall(f"genq:job:{job}:attempts").items()}
    handed = deliveries(pair.logs(), job)
    assert attempts and all(attempts[c] <= handed[c] for c in attempts), (attempts, handed)
    return attempts


# --- 1. two live workers on one chunk -----------------------------------------------------------------


def test_two_live_workers_on_one_chunk_first_write_wins(pair: Pair, tmp_path: Path) -> None:
    """One chunk of 64 items outlives the visibility timeout: kombu puts it back while its first
    worker generates, the idle one takes it, both generate the same items.  Sampled every 50 ms
    while the job runs: counts never exceed the total; once every delivery has returned: succeeded ==
    total, the job's completion and prompt tokens equal the sums over the stored results, each
    item was kept once (the workers' events), and each stored result is that first write's
    (its ``worker`` and ``attempts``).  The items generated and then dropped are reported."""
    r = pair.server.client()
    total = 64
    job = submit(pair, total, total, tmp_path)
    samples, bad = 0, []
    while not final_status(r, job):
        raw = r.hgetall(f"genq:job:{job}")
        done = sum(int(raw.get(k, 0)) for k in ("succeeded", "errored", "cancelled", "expired"))
        if done > total or int(raw.get("succeeded", 0)) > total:
            bad.append(raw)
        samples += 1
        time.sleep(0.05)
        assert samples < 1200, "the job did not end within a minute"
    assert not bad, bad[:3]
    settle(r, pair, job)  # the other worker goes on generating (and dropping) after the end
    assert job_counts(r, job) == {
        "status": "completed", "total": total, "succeeded": total, "errored": 0, "cancelled": 0, "expired": 0
    }  # fmt: skip
    results = stored(r, job)
    raw = r.hgetall(f"genq:job:{job}")
    assert int(raw["completion_tokens"]) == sum(x.usage.completion_tokens for x in results.values())
    assert int(raw["prompt_tokens"]) == sum(x.usage.prompt_tokens for x in results.values())

    ledger = Ledger.from_logs(pair.logs(), job)
    writers = ledger.writers()
    assert sorted(writers) == list(range(total)) and ledger.duplicates == 0
    wrong = ledger.not_first(results)
    assert not wrong, f"stored results that are not the first write (stored vs first): {wrong}"
    # the chunk really was held by two live workers: both wrote, both dropped, in overlapping time
    by_worker = {w.name: [x for x in ledger.writes if x.worker == w.name] for w in pair.workers}
    assert all(by_worker.values()), {k: len(v) for k, v in by_worker.items()}
    first, second = sorted(by_worker.values(), key=lambda ws: ws[0].at)
    assert second[0].at < first[-1].at, "the second worker started after the first had finished"
    assert ledger.dropped_items > 0
    attempts = assert_attempts_match_deliveries(r, pair, job)
    assert attempts["c000000"] >= 2
    assert collect_ids(pair, job, tmp_path / "out.jsonl") == [f"p{i:04d}" for i in range(total)]
    report = {
        "items": total,
        "samples": samples,
        "attempts": attempts["c000000"],
        "written_by": {k: sum(len(x.written) for x in v) for k, v in by_worker.items()},
        **ledger.summary(int(raw["completion_tokens"])),
    }
    print("\nTWO-LIVE-WORKERS " + json.dumps(report))


# --- 2. redelivery to a running peer ----------------------------------------------------------------


def chunk_indices(r: redis.Redis, job: str, chunk: str) -> list[int]:
    spec = json.loads(r.hget(f"genq:job:{job}", "spec") or "{}")
    n = chunk_number(chunk)
    assert n is not None
    return list(chunk_range(n, int(spec["total"]), int(spec["chunk_size"])))


def test_a_killed_workers_chunk_goes_to_the_running_peer_in_time(pair: Pair, tmp_path: Path) -> None:
    """Three chunks of 5 items (about 1.1 s each) on two workers.  The first worker seen in the
    middle of a chunk, with items of it not written, is SIGKILLed; the other, never restarted,
    finishes the job.  From the kill to the peer's first result of the killed chunk, timed here,
    takes at most 2 × the visibility timeout + the longest chunk's run time.  With kombu's default
    sweep (10 × 10 s) it takes up to 100 s, and this test fails."""
    r = pair.server.client()
    total = 3 * SHORT_CHUNK
    job = submit(pair, total, SHORT_CHUNK, tmp_path)

    def mid_chunk() -> tuple[WorkerProcess, str] | None:
        for w in pair.workers:
            busy = in_flight(r, job, worker=w.name, since=w.spawned_at)
            for chunk, unwritten in busy.items():
                if unwritten > 0:
                    return w, chunk
        return None

    victim, chunk = wait_for(mid_chunk, timeout=60, interval=0.01, what="a worker mid-chunk")
    (peer,) = [w for w in pair.workers if w is not victim]
    victim.kill()
    killed_at = time.monotonic()
    left = [i for i in chunk_indices(r, job, chunk) if not r.hexists(f"genq:job:{job}:results", str(i))]
    assert left, "the chunk finished between the look and the kill"

    def peer_result() -> float | None:
        got = r.hmget(f"genq:job:{job}:results", [str(i) for i in left])
        if any(g is not None and json.loads(g)["worker"] == peer.name for g in got):
            return time.monotonic()
        return None

    first_at = wait_for(
        peer_result, timeout=2 * VISIBILITY + 30, interval=0.02, what="the peer's first result"
    )
    seconds = first_at - killed_at
    assert wait_for(lambda: final_status(r, job), timeout=60, what="the job's end") == "completed"
    settle(r, pair, job, killed=1)
    chunk_seconds = [
        float(str(e["seconds"]))
        for w in (peer, victim)
        for e in log_events(w.log_path, "chunk_done", job=job)
        if e["items"] == SHORT_CHUNK
    ]
    longest = max(chunk_seconds)
    assert seconds <= 2 * VISIBILITY + longest, (seconds, longest)
    assert peer.alive() and peer.starts == 1
    results = stored(r, job)
    assert {results[i].worker for i in left} == {peer.name}
    assert collect_ids(pair, job, tmp_path / "out.jsonl") == [f"p{i:04d}" for i in range(total)]
    attempts = assert_attempts_match_deliveries(r, pair, job)
    assert attempts[chunk] >= 2
    report = {
        "visibility_timeout": VISIBILITY,
        "kill_to_first_result_s": round(seconds, 2),
        "bound_s": round(2 * VISIBILITY + longest, 2),
        "chunk_seconds_max": round(longest, 2),
        "items_left_at_kill": len(left),
    }
    print("\nREDELIVERY " + json.dumps(report))
