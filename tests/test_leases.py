"""Chunk leases with the default settings: a live worker keeps its chunk however long it runs, a
SIGKILLed worker's chunk is finished by a running peer within 90 s.

Real ``redis-server``, real ``genq-worker`` processes, the default lease (``GENQ_LEASE_SECONDS``)
and visibility timeout (nothing lowered) and the default heartbeat interval.  One worker is made
slow with the existing fault switch ``GENQ_FAULT_SLOW_MS``: its profile decodes one row at a time
(micro-batches of 4 items) and it sleeps :data:`SLOW_MS` after each micro-batch.  Backup execution
is off (``GENQ_BACKUP=false``): an idle peer would otherwise take over the slow worker's items
before any lease matters, and these tests are about the lease.

To have the slow worker take the chunk, the peer (full speed) is started only once the slow one
runs it; a chunk put back on the queue would go to that idle peer at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.cluster import final_status, in_flight, job_counts, log_events
from tests.helpers import RedisServer, WorkerProcess, genq, one_row_profile, rows, wait_for, write_prompts
from tests.ledger import Ledger, deliveries
from worker.core.settings import Settings

PROFILE = "tiny-rows1"
SLOW_MS = 20_000
"""The slow worker's pause after each micro-batch of 4 items."""
LEASE = float(Settings.model_fields["lease_seconds"].default)
HEARTBEAT = str(Settings.model_fields["heartbeat_interval"].default)
KILL_BOUND = 90.0
"""Seconds from the SIGKILL to the peer's last result of the killed chunk."""


@dataclass
class Lab:
    server: RedisServer
    configs: Path
    folder: Path
    slow: WorkerProcess

    def peer(self, name: str) -> WorkerProcess:
        """A full-speed worker (not started)."""
        return WorkerProcess(
            self.server.url, self.folder / f"{name}.log", profile=PROFILE, name=name, env=self.env()
        )

    def env(self, **extra: str) -> dict[str, str]:
        # the harness sets a 1 s heartbeat by default: these tests keep every default
        return {
            "GENQ_CONFIGS_DIR": str(self.configs),
            "GENQ_HEARTBEAT_INTERVAL": HEARTBEAT,
            "GENQ_BACKUP": "false",
            **extra,
        }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for var in ("GENQ_VISIBILITY_TIMEOUT", "GENQ_LEASE_SECONDS"):
        assert not os.environ.get(var), f"{var} is set: these tests need the defaults"
    folder = tmp_path_factory.mktemp("leases")
    configs = one_row_profile(folder, PROFILE)
    server = RedisServer(folder / "redis")
    server.start()
    lab = Lab(server, configs, folder, None)  # type: ignore[arg-type]
    lab.slow = WorkerProcess(
        server.url,
        folder / "slow.log",
        profile=PROFILE,
        name="slow",
        env=lab.env(GENQ_FAULT_SLOW_MS=str(SLOW_MS)),
    )
    try:
        lab.slow.start()
        yield lab
    finally:
        lab.slow.stop()
        server.stop()


def submit(lab: Lab, n: int, folder: Path) -> str:
    prompts = write_prompts(folder / "in.jsonl", n, max_new_tokens=6)
    args = ["submit", str(prompts), "--profile", PROFILE, "--chunk-size", str(n)]
    return genq(lab.server.url, *args, GENQ_CONFIGS_DIR=str(lab.configs)).stdout.split()[-1]


def slow_runs_it(r: redis.Redis, lab: Lab, job: str) -> None:
    wait_for(
        lambda: in_flight(r, job, worker="slow", since=lab.slow.spawned_at),
        timeout=120,
        what="the slow worker to start the chunk",
    )


def test_a_live_workers_chunk_running_3x_the_lease_is_never_put_back(lab: Lab, tmp_path: Path) -> None:
    """One chunk of 24 items on the slow worker: 6 micro-batches × 20 s, over 3 × the lease.  An
    idle peer runs beside it all along.  The chunk is delivered once (Celery's own ``received``
    lines of both workers), its attempt count is 1, no sweep put it back, the slow worker wrote
    every result, and the chunk really ran longer than 3 × the lease.  With
    ``GENQ_FAULT_NO_LEASE_RENEWAL=1`` on the slow worker, the lease lapses after 30 s, the chunk
    goes to the peer and this test fails."""
    r = lab.server.client()
    total = 24
    job = submit(lab, total, tmp_path)
    slow_runs_it(r, lab, job)
    peer = lab.peer("peer-long").start()
    try:
        status = wait_for(lambda: final_status(r, job), timeout=600, interval=1.0, what="the job's end")
        assert status == "completed"
        logs = [lab.slow.log_path, peer.log_path]
        received = deliveries(logs, job)
        assert received == {"c000000": 1}, received
        done = wait_for(
            lambda: log_events(lab.slow.log_path, "chunk_done", job=job), timeout=60, what="chunk_done"
        )  # logged just after the last result, which ends the job
        seconds = float(str(done[0]["seconds"]))
        report = {
            "lease_s": LEASE,
            "chunk_seconds": round(seconds, 1),
            "deliveries": dict(received),
            "attempts": r.hgetall(f"genq:job:{job}:attempts"),
        }
        print("\nLONG-CHUNK " + json.dumps(report))
        assert received == {"c000000": 1}, received
        assert r.hget(f"genq:job:{job}:attempts", "c000000") == "1"
        assert not log_events(peer.log_path, "lease_lapsed_chunk_requeued")
        assert not log_events(lab.slow.log_path, "lease_lapsed_chunk_requeued")
        assert seconds > 3 * LEASE, seconds
        workers = {json.loads(v)["worker"] for v in r.hvals(f"genq:job:{job}:results")}
        assert workers == {"slow"}
    finally:
        peer.stop()


def test_a_sigkilled_workers_long_chunk_is_finished_by_a_running_peer_within_90s(
    lab: Lab, tmp_path: Path
) -> None:
    """One chunk of 32 items on the slow worker: 8 micro-batches × 20 s, over 2 minutes.  Once
    its first results are written the slow worker is SIGKILLed (the whole process group); the
    running peer must have written every remaining item of the chunk within 90 s of the kill,
    timed by this test's clock.  Nothing is counted twice: the job's counts and tokens equal the
    stored results, each item was kept once (the workers' own events), and the output is every
    item once, in order.  Without genq's lease sweep (only kombu's 6 h visibility timeout) the
    chunk stays lost and this test fails."""
    r = lab.server.client()
    total = 32
    job = submit(lab, total, tmp_path)
    slow_runs_it(r, lab, job)
    peer = lab.peer("peer-kill").start()
    try:
        results_key = f"genq:job:{job}:results"
        wait_for(lambda: r.hlen(results_key) > 0, timeout=120, interval=0.05, what="the first results")
        lab.slow.kill()
        killed_at = time.monotonic()
        left = [i for i in range(total) if not r.hexists(results_key, str(i))]
        assert left, "the chunk finished before the kill"

        def all_done() -> float | None:
            return time.monotonic() if r.hlen(results_key) >= total else None

        done_at = wait_for(all_done, timeout=KILL_BOUND + 60, interval=0.1, what="the peer to finish")
        seconds = done_at - killed_at
        assert wait_for(lambda: final_status(r, job), timeout=60, what="the job's end") == "completed"
        stored = {int(i): json.loads(v) for i, v in r.hgetall(results_key).items()}
        ledger = Ledger.from_logs([lab.slow.log_path, peer.log_path], job)
        raw = r.hgetall(f"genq:job:{job}")
        report = {
            "lease_s": LEASE,
            "items_left_at_kill": len(left),
            "kill_to_last_result_s": round(seconds, 1),
            "bound_s": KILL_BOUND,
            **ledger.summary(int(raw["completion_tokens"])),
        }
        print("\nKILL-RECOVERY " + json.dumps(report))
        assert seconds <= KILL_BOUND, report
        assert {stored[i]["worker"] for i in left} == {peer.name}
        counts = {"status": "completed", "total": total, "succeeded": total}
        assert job_counts(r, job) == {**counts, "errored": 0, "cancelled": 0, "expired": 0}
        assert int(raw["completion_tokens"]) == sum(x["usage"]["completion_tokens"] for x in stored.values())
        assert sorted(ledger.writers()) == list(range(total)) and ledger.duplicates == 0
        assert peer.alive() and peer.starts == 1
        out = tmp_path / "out.jsonl"
        genq(lab.server.url, "collect", job, "-o", str(out), GENQ_CONFIGS_DIR=str(lab.configs))
        assert [row["id"] for row in rows(out)] == [f"p{i:04d}" for i in range(total)]
    finally:
        peer.stop()
