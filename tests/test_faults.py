"""Nothing lost: worker crashes, poison items, OOM, Redis restarts, SIGTERM, cancel, expiry.

Every test here runs against a real ``redis-server`` and real ``genq-worker`` processes (or a real
``genq run`` process), injects the fault for real (SIGKILL, SIGTERM, a Redis restart, the test-only
``GENQ_FAULT_*`` switches in the worker's own environment) and then checks the store and the
collected output item by item: exact counts, exact ids in input order, each item once, and texts
equal to a clean greedy run of the same prompts (the embedded ``genq run``, no broker).

All prompt files are the first N lines of one 400-line file (greedy, ``max_new_tokens`` 6), so one
clean run gives the expected text of every item in every test; the engine's greedy output does not
depend on how items are batched, so a chunk redone after a crash must give the same text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cluster import final_status, in_flight, job_counts, kill_mid_chunk, log_events
from tests.helpers import REPO, RedisServer, WorkerProcess, env_for, genq, rows, wait_for, write_prompts
from tests.ledger import Ledger

PROFILE = "tiny-random"
QUEUE_ANY = f"genq.{PROFILE}.any"
MAX_NEW_TOKENS = 6
POISON_INDEX = 5
POISON_MARKER = "poisonpill"
FAST = {"GENQ_VISIBILITY_TIMEOUT": "5"}
"""Every worker here: a dead worker's chunk is back on its queue within about 1.25 × 5 s."""


def waiting_task_ids(r: redis.Redis, job: str) -> list[str]:
    """Task ids (without the incarnation) of the job's chunk messages waiting anywhere: its
    backlog, the ``any`` queue and each mode's queue (a worker's dispatch moves chunks of ``any``
    jobs to its own mode's queue; a handed-back chunk returns to the queue it came from)."""
    lists = [f"genq:job:{job}:backlog", QUEUE_ANY, f"genq.{PROFILE}.fp32", f"genq.{PROFILE}.nf4"]
    return [json.loads(m)["headers"]["id"].partition("@")[0] for key in lists for m in r.lrange(key, 0, -1)]


# --- shared inputs and the clean reference --------------------------------------------------------


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 greedy prompts; item 5's prompt carries the poison marker (harmless to workers that
    were not started with GENQ_FAULT_POISON_MARKER)."""
    path = write_prompts(tmp_path_factory.mktemp("prompts") / "master.jsonl", 400, max_new_tokens=6)
    lines = path.read_text().splitlines()
    row = json.loads(lines[POISON_INDEX])
    row["prompt"] += f" {POISON_MARKER}"
    lines[POISON_INDEX] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(master: Path) -> dict[str, str]:
    """Item id → text of a clean embedded run (no broker, no faults) of all 400 prompts."""
    out = master.with_name("reference.jsonl")
    genq(None, "run", str(master), "-o", str(out), "--profile", PROFILE)
    got = rows(out)
    assert len(got) == 400 and all(r["status"] == "ok" for r in got)
    return {r["id"]: r["text"] for r in got}


def take(master: Path, n: int, path: Path) -> Path:
    """The first ``n`` prompts of the master file."""
    path.write_text("".join(line + "\n" for line in master.read_text().splitlines()[:n]))
    return path


def ids(n: int) -> list[str]:
    return [f"p{i:04d}" for i in range(n)]


def submit(url: str, prompts: Path, *args: str) -> str:
    return genq(url, "submit", str(prompts), "--profile", PROFILE, *args).stdout.split()[-1]


def status_json(url: str, job_id: str) -> dict[str, Any]:
    return dict(json.loads(genq(url, "status", job_id, "--json").stdout))


def counts(**kw: int) -> dict[str, int]:
    """A full counts dict: zero unless given; pending derived."""
    c = {"total": 0, "succeeded": 0, "errored": 0, "cancelled": 0, "expired": 0, **kw}
    c["pending"] = c["total"] - c["succeeded"] - c["errored"] - c["cancelled"] - c["expired"]
    return c


def stored(status: str, **kw: int) -> dict[str, int | str]:
    """What :func:`job_counts` reads for a job in ``status`` with these counts (zero unless given)."""
    c = counts(**kw)
    del c["pending"]
    return {"status": status, **c}


def attempts(r: redis.Redis, job_id: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in r.hgetall(f"genq:job:{job_id}:attempts").items()}


def wait_final(r: redis.Redis, job_id: str, timeout: float = 120.0) -> str:
    return wait_for(lambda: final_status(r, job_id), timeout=timeout, what=f"job {job_id} final")


def collect(url: str, job_id: str, out: Path, *args: str) -> tuple[list[dict[str, Any]], str]:
    proc = genq(url, "collect", job_id, "-o", str(out), *args)
    return rows(out), proc.stderr


def assert_exactly_once_ok(got: list[dict[str, Any]], n: int, reference: dict[str, str]) -> None:
    """Every one of the first ``n`` items once, in input order, ok, with the clean run's text."""
    assert [r["id"] for r in got] == ids(n)
    assert [r["line"] for r in got] == list(range(1, n + 1))
    assert [r["status"] for r in got] == ["ok"] * n
    wrong = [r["id"] for r in got if r["text"] != reference[r["id"]]]
    assert not wrong, f"texts differ from the clean run for {wrong[:10]}"


# --- the done-when: three SIGKILLs of the only worker ---------------------------------------------


def test_400_items_survive_three_sigkills_of_the_only_worker(
    redis_server: RedisServer, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """The issue's done-when.  A 400-item job in chunks of 4; its only worker (visibility timeout
    5 s) is SIGKILLed three times while it is generating a chunk of the job, each time after more
    progress, and restarted.  The job completes; collect gives every item exactly once, in order,
    all ok, with the text of a clean run; each chunk killed with unwritten items was delivered
    once more per kill and no other chunk more than once; nothing was split or errored."""
    r = redis_server.client()
    prompts = take(master, 400, tmp_path / "in.jsonl")
    worker = WorkerProcess(
        redis_server.url, tmp_path / "victim.log", name="victim", env={**FAST, "GENQ_FAULT_SLOW_MS": "20"}
    ).start()
    in_flight_at_kill: list[int] = []
    try:
        started = time.monotonic()
        job = submit(redis_server.url, prompts, "--chunk-size", "4")
        for at in (60, 160, 260):
            wait_for(lambda at=at: job_counts(r, job)["succeeded"] >= at, timeout=120, what=f"{at} done")
            left = kill_mid_chunk(worker, r, job)
            assert left is not None, "the job ended before the kill"
            in_flight_at_kill.append(left)
            assert not worker.alive()
            now = job_counts(r, job)
            assert now["status"] == "in_progress" and int(now["succeeded"]) < 400
            worker.start()
        assert wait_final(r, job, timeout=180) == "completed"
        seconds = time.monotonic() - started
    finally:
        worker.stop()
    assert worker.starts == 4
    state = status_json(redis_server.url, job)
    assert state["status"] == "completed" and state["counts"] == counts(total=400, succeeded=400)
    got, _ = collect(redis_server.url, job, tmp_path / "out.jsonl")
    assert_exactly_once_ok(got, 400, reference)
    tries = attempts(r, job)
    # at least one kill hit unwritten items (else this proves little); each kill cost at most one
    # extra delivery, and every kill that caught unwritten items exactly one; no other redelivery
    caught = sum(1 for n in in_flight_at_kill if n)
    assert caught >= 1, in_flight_at_kill
    assert caught <= sum(v - 1 for v in tries.values()) <= 3
    assert len(tries) == 100 and min(tries.values()) == 1
    assert not log_events(worker.log_path, "chunk_split") and not log_events(worker.log_path, "chunk_failed")
    # what the worker says it wrote: nothing kept twice (a kill between a write and its log line
    # leaves that write, at most 8 rows, out of the events)
    ledger = Ledger.from_logs([worker.log_path], job)
    assert ledger.duplicates == 0 and 400 - 8 * len(in_flight_at_kill) <= ledger.written_items <= 400
    written = ledger.summary(sum(r["usage"]["completion_tokens"] for r in got))
    print(
        "\nDONE-WHEN "
        + json.dumps(
            {
                "items": 400,
                "kills": len(in_flight_at_kill),
                "items_in_flight_at_kills": in_flight_at_kill,
                "lost": 400 - len({r["id"] for r in got}),
                "duplicates": written["duplicates"],
                "dropped_items": written["dropped_items"],
                "wasted_token_ratio": written["wasted_token_ratio"],
                "max_attempts": max(tries.values()),
                "chunks_redelivered": sum(1 for v in tries.values() if v > 1),
                "seconds": round(seconds, 1),
            }
        )
    )


# --- a poison item, then `genq retry` ------------------------------------------------------------


@dataclass
class Poisoned:
    server: RedisServer
    folder: Path
    job: str
    deaths: int
    attempts: dict[str, int]
    state: dict[str, Any]
    results: list[dict[str, Any]]
    log: Path


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory, master: Path) -> Iterator[Poisoned]:
    """10 items in chunks of 2; item 5 kills any worker that starts it (GENQ_FAULT_POISON_MARKER),
    GENQ_MAX_ATTEMPTS=2.  The fixture is the supervisor: it restarts the worker whenever it dies,
    until the job is final.  What it saw is kept before any test changes the job."""
    folder = tmp_path_factory.mktemp("poison")
    server = RedisServer(folder / "redis")
    server.start()
    env = {**FAST, "GENQ_FAULT_POISON_MARKER": POISON_MARKER, "GENQ_MAX_ATTEMPTS": "2"}
    worker = WorkerProcess(server.url, folder / "poisoned.log", name="poisoned", env=env).start()
    r = server.client()
    deaths = 0
    try:
        job = submit(server.url, take(master, 10, folder / "in.jsonl"), "--chunk-size", "2")

        def supervise() -> bool:
            nonlocal deaths
            if job_counts(r, job)["status"] == "completed":
                return True
            if not worker.alive():
                deaths += 1
                worker.start(wait=False)
            return False

        wait_for(supervise, timeout=240, interval=0.1, what="the poisoned job to complete")
        got, _ = collect(server.url, job, folder / "out.jsonl")
        yield Poisoned(
            server, folder, job, deaths, attempts(r, job), status_json(server.url, job), got, worker.log_path
        )
    finally:
        worker.stop()
        server.stop()


def test_poison_item_is_isolated_and_recorded_as_worker_lost(
    poisoned: Poisoned, reference: dict[str, str]
) -> None:
    """An item that kills every worker that starts it costs exactly 4 worker deaths with
    GENQ_MAX_ATTEMPTS=2 (its chunk of 2 twice, then the half holding it twice); its chunk is split
    to isolate it, it is recorded as ``worker_lost`` with its 2 attempts, its chunk-mate and every
    other item succeed with the clean run's text, and the job completes."""
    assert poisoned.deaths == 4
    assert poisoned.state["status"] == "completed"
    assert poisoned.state["counts"] == counts(total=10, succeeded=9, errored=1)
    got = poisoned.results
    assert [r["id"] for r in got] == ids(10)
    bad = got[POISON_INDEX]
    assert bad["status"] == "error" and bad["error"]["type"] == "worker_lost"
    assert bad["attempts"] == 2 and "died 2 times" in bad["error"]["message"]
    good = [r for r in got if r["id"] != bad["id"]]
    assert all(r["status"] == "ok" and r["text"] == reference[r["id"]] for r in good)
    # c000002 holds items 4 and 5: delivered twice (both killed), a third time it is split;
    # c000002.1 holds item 5 alone: killed twice, recorded on the third delivery
    assert poisoned.attempts == {
        "c000000": 1,
        "c000001": 1,
        "c000002": 3,
        "c000002.0": 1,
        "c000002.1": 3,
        "c000003": 1,
        "c000004": 1,
    }
    assert len(log_events(poisoned.log, "fault_poison_item")) == 4
    splits = log_events(poisoned.log, "chunk_split")
    assert [(e["chunk"], e["children"]) for e in splits] == [
        ("c000002", ["c000002.0", "c000002.1"]),
    ]
    assert [e["item"] for e in log_events(poisoned.log, "item_worker_lost")] == [f"p{POISON_INDEX:04d}"]


def test_retry_reruns_only_the_errored_item(poisoned: Poisoned, reference: dict[str, str]) -> None:
    """`genq retry` on the poisoned job, once a worker without the fault runs: exactly the one
    errored item is re-enqueued and generated, the job goes back to completed with all 10 ok and
    the clean run's texts, and the 9 earlier results are untouched (same worker, latency)."""
    url = poisoned.server.url
    healthy = WorkerProcess(url, poisoned.folder / "healthy.log", name="healthy", env=FAST).start()
    try:
        proc = genq(url, "retry", poisoned.job)
        assert f"re-enqueued 1 errored items of {poisoned.job}" in proc.stderr
        r = poisoned.server.client()
        assert wait_final(r, poisoned.job) == "completed"
        again = genq(url, "retry", poisoned.job)
        assert "re-enqueued 0 errored items" in again.stderr
    finally:
        healthy.stop()
    state = status_json(url, poisoned.job)
    assert state["counts"] == counts(total=10, succeeded=10)
    got, _ = collect(url, poisoned.job, poisoned.folder / "retried.jsonl")
    assert_exactly_once_ok(got, 10, reference)
    assert got[POISON_INDEX]["worker"] == "healthy"
    before = {r["id"]: r for r in poisoned.results}
    assert all(r == before[r["id"]] for r in got if r["id"] != f"p{POISON_INDEX:04d}")
    done = log_events(healthy.log_path, "chunk_done", job=poisoned.job)
    assert [e["items"] for e in done] == [1]


# --- out of memory --------------------------------------------------------------------------------


def test_oom_backoff_halves_the_batch_and_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """With micro-batches above 2 rows raising an injected out-of-memory error, a chunk of 8 backs
    off 8 → 4 → 2 rows (two ``oom_backoff`` events, then the smaller limit sticks), the job
    completes all ok, each chunk delivered once, and the texts equal a clean run."""
    r = redis_server.client()
    env = {**FAST, "GENQ_FAULT_OOM_ABOVE": "2"}
    worker = WorkerProcess(redis_server.url, tmp_path / "oom.log", name="oom", env=env).start()
    try:
        job = submit(redis_server.url, take(master, 40, tmp_path / "in.jsonl"), "--chunk-size", "8")
        assert wait_final(r, job) == "completed"
    finally:
        worker.stop()
    backoffs = log_events(worker.log_path, "oom_backoff")
    assert [(e["rows"], e["new_limit"]) for e in backoffs] == [(8, 4), (4, 2)]
    assert status_json(redis_server.url, job)["counts"] == counts(total=40, succeeded=40)
    got, _ = collect(redis_server.url, job, tmp_path / "out.jsonl")
    assert_exactly_once_ok(got, 40, reference)
    assert set(attempts(r, job).values()) == {1}


# --- Redis restarts --------------------------------------------------------------------------------


def test_redis_restart_mid_job_worker_and_producer_reconnect(
    redis_server: RedisServer, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """Redis (append-only file on) is stopped for 2 s while a 200-item job is in progress and a
    producer (`genq run` with a broker) follows it.  The same worker process and the same producer
    process ride it out: the job completes, the producer writes all 200 rows, each once, in order,
    with the clean run's texts, and the counts are exact."""
    env = {**FAST, "GENQ_FAULT_SLOW_MS": "40"}
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="steady", env=env).start()
    prompts = take(master, 200, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["run", str(prompts), "-o", str(out), "--profile", PROFILE, "--chunk-size", "4"]
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args, "--job-id", "restart-1"],
        cwd=REPO,
        env=env_for(redis_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = redis_server.client()
        wait_for(lambda: job_counts(r, "restart-1")["succeeded"] >= 40, timeout=120, what="progress")
        before = int(job_counts(r, "restart-1")["succeeded"])
        old_pid = redis_server.proc.pid if redis_server.proc else None
        redis_server.restart(down_seconds=2)
        assert redis_server.proc is not None and redis_server.proc.pid != old_pid
        _, err = producer.communicate(timeout=180)
        assert producer.returncode == 0, err[-3000:]
        assert worker.alive() and worker.starts == 1
    finally:
        if producer.poll() is None:
            producer.kill()
        worker.stop()
    assert before < 200
    r = redis_server.client()
    assert job_counts(r, "restart-1") == stored("completed", total=200, succeeded=200)
    assert_exactly_once_ok(rows(out), 200, reference)
    assert int(r.hget("genq:job:restart-1:workers", "steady:items") or 0) == 200


def test_a_lost_message_is_published_again_once_the_job_is_quiet(
    redis_server: RedisServer, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """A chunk message that is nowhere (kombu takes a message off its queue before it records it
    unacknowledged: a Redis or worker stopped between the two loses it; here removed by hand from
    the job's backlog before any worker ran): once the job has gone quiet for
    ``GENQ_RECOVERY_SECONDS`` the running worker publishes its items again as a new chunk, and
    the job completes with each item once.  Without the look (``GENQ_RECOVERY_SECONDS=0``) the job
    stays at 8 of 12 for good."""
    r = redis_server.client()
    job = submit(
        redis_server.url, take(master, 12, tmp_path / "in.jsonl"), "--chunk-size", "4", "--job-id", "lost-1"
    )
    backlog = f"genq:job:{job}:backlog"
    lost = next(m for m in r.lrange(backlog, 0, -1) if '"lost-1:c000001@' in m)
    assert r.lrem(backlog, 1, lost) == 1
    env = {**FAST, "GENQ_RECOVERY_SECONDS": "3", "GENQ_HEARTBEAT_INTERVAL": "1"}
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="finder", env=env).start()
    try:
        wait_for(lambda: job_counts(r, job)["succeeded"] == 8, timeout=120, what="the two other chunks")
        quiet_from = time.time()
        assert wait_final(r, job, timeout=60) == "completed"
        took = time.time() - quiet_from
    finally:
        worker.stop()
    found = log_events(worker.log_path, "lost_chunks_published", job=job)
    assert len(found) == 1 and found[0]["items"] == 4, found
    chunks = r.hgetall(f"genq:job:{job}:chunks")
    assert [json.loads(chunks[c]) for c in found[0]["chunks"]] == [[4, 5, 6, 7]]  # type: ignore[union-attr]
    # quiet for GENQ_RECOVERY_SECONDS, seen by a heartbeat (1 s) twice, then one chunk's run
    assert took < 3 + 2 * 1 + 15, took
    assert job_counts(r, job) == stored("completed", total=12, succeeded=12)
    got, _ = collect(redis_server.url, job, tmp_path / "out.jsonl")
    assert_exactly_once_ok(got, 12, reference)


# --- SIGTERM ----------------------------------------------------------------------------------------


def test_sigterm_mid_chunk_hands_back_the_rest_and_nothing_is_half_written(
    redis_server: RedisServer, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """A worker gets SIGTERM after the first micro-batch (32 items) of a 64-item chunk: it exits
    cleanly (status 0) within seconds, having written exactly those 32 complete results (each the
    clean run's text), not counted the delivery as an attempt, and put the chunk's message back on
    the queue.  Submitting the same job id again then enqueues nothing (every chunk's message is
    still there).  A restarted worker generates only the 32 missing items of that chunk and the
    job completes with each item once."""
    r = redis_server.client()
    slow = {**FAST, "GENQ_FAULT_SLOW_MS": "3000"}
    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", name="polite", env=slow).start()
    prompts = take(master, 128, tmp_path / "in.jsonl")
    job = submit(redis_server.url, prompts, "--chunk-size", "64", "--job-id", "term-1")
    try:
        wait_for(lambda: job_counts(r, job)["succeeded"] >= 32, timeout=60, what="first micro-batch")
        running = in_flight(r, job, worker="polite")
        assert list(running.values()) == [32], running
        t0 = time.monotonic()
        assert worker.terminate(timeout=30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        worker.stop()
    (chunk,) = running
    handed = log_events(worker.log_path, "chunk_handed_back", job=job)
    assert [(e["chunk"], e["written"]) for e in handed] == [(chunk, 32)]
    # a normal hand-back is an event, not a crash: Celery's Reject line carries no traceback
    rejected = [e for e in log_events(worker.log_path) if "reject requeue=True" in str(e.get("event"))]
    assert len(rejected) == 1 and "Traceback" not in worker.log_path.read_text()
    assert job_counts(r, job) == stored("in_progress", total=128, succeeded=32)
    assert r.hgetall(f"genq:job:{job}:running") == {}
    assert attempts(r, job).get(chunk) == 0
    assert r.hlen("unacked") == 0
    assert sorted(waiting_task_ids(r, job)) == [f"{job}:c000000", f"{job}:c000001"]
    written = [json.loads(v) for v in r.hgetall(f"genq:job:{job}:results").values()]
    assert len(written) == 32
    assert all(w["status"] == "ok" and w["text"] == reference[w["id"]] for w in written)
    # the same job again: nothing new is enqueued
    again = genq(
        redis_server.url, "submit", str(prompts), "--profile", PROFILE, "--chunk-size", "64", "--job-id", job
    )
    assert "resumed 128 items in 0 chunks (96 pending)" in again.stderr
    assert len(waiting_task_ids(r, job)) == 2

    worker.extra_env = dict(FAST)
    worker.start()
    try:
        assert wait_final(r, job) == "completed"
    finally:
        worker.stop()
    got, _ = collect(redis_server.url, job, tmp_path / "out.jsonl")
    assert_exactly_once_ok(got, 128, reference)
    done = log_events(worker.log_path, "chunk_done", job=job)
    assert sorted((e["chunk"], e["items"]) for e in done) == sorted(
        [(chunk, 32), ("c000001" if chunk == "c000000" else "c000000", 64)]
    )
    assert attempts(r, job) == {"c000000": 1, "c000001": 1}


# --- cancel, resubmit, mixed hardware: one Redis, an fp32 and an nf4 worker ---------------------


@dataclass
class Stack:
    server: RedisServer
    fp32: WorkerProcess
    nf4: WorkerProcess

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Redis, an fp32 worker and an nf4 worker (bitsandbytes' CPU backend), both tiny-random,
    both 30 ms slower per micro-batch so that jobs last long enough to act on mid-way."""
    folder = tmp_path_factory.mktemp("stack")
    server = RedisServer(folder / "redis")
    server.start()
    env = {**FAST, "GENQ_FAULT_SLOW_MS": "30"}
    fp32 = WorkerProcess(server.url, folder / "cpu.log", mode="fp32", name="cpu-a", env=env)
    nf4 = WorkerProcess(server.url, folder / "nf4.log", mode="nf4", name="nf4-b", env=env)
    try:
        fp32.start(wait=False)
        nf4.start(wait=False)
        fp32.wait_ready()
        nf4.wait_ready()
        yield Stack(server, fp32, nf4)
    finally:
        fp32.stop()
        nf4.stop()
        server.stop()


def test_cancel_mid_job_skips_pending_chunks_and_collects_the_finished_part(
    stack: Stack, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """`genq cancel` on a 400-item job in progress: the reply says how many items it cancels (a
    count: no row is written per item), the job ends ``cancelled`` with succeeded + cancelled = 400
    and no errors once the chunk in flight finishes, nothing succeeds
    after that, the remaining messages are drained without generating, and `genq collect` writes
    exactly the succeeded items in input order (with ``--all`` every item, the rest as
    ``cancelled`` errors)."""
    r = stack.server.client()
    job = submit(stack.url, take(master, 400, tmp_path / "in.jsonl"), "--chunk-size", "2")
    wait_for(lambda: job_counts(r, job)["succeeded"] >= 20, timeout=60, what="progress")
    reply = json.loads(genq(stack.url, "cancel", job).stdout)
    assert reply["status"] in ("cancelling", "cancelled") and reply["cancelling"] > 0
    assert wait_final(r, job) == "cancelled"
    final = job_counts(r, job)
    wait_for(lambda: r.llen(QUEUE_ANY) == 0, timeout=60, what="the queue drained")
    assert job_counts(r, job) == final  # nothing ran after the job was cancelled
    ok, cancelled = int(final["succeeded"]), int(final["cancelled"])
    assert ok >= 20 and cancelled > 0 and ok + cancelled == 400 and final["errored"] == 0
    assert cancelled <= reply["cancelling"]  # the chunk in flight may finish some of them
    assert len(r.hgetall(f"genq:job:{job}:results")) == ok  # cancelled items are a count, not rows
    state = status_json(stack.url, job)
    assert state["status"] == "cancelled"
    assert state["counts"] == counts(total=400, succeeded=ok, cancelled=cancelled)

    got, err = collect(stack.url, job, tmp_path / "part.jsonl")
    assert "0 pending; status cancelled" in err
    stored_results = {int(i): json.loads(v) for i, v in r.hgetall(f"genq:job:{job}:results").items()}
    assert len(stored_results) == ok
    ok_ids = [stored_results[i]["id"] for i in sorted(stored_results) if stored_results[i]["status"] == "ok"]
    assert [row["id"] for row in got] == ok_ids and len(got) == ok
    assert all(row["status"] == "ok" for row in got)
    everything, _ = collect(stack.url, job, tmp_path / "all.jsonl", "--all")
    assert [row["id"] for row in everything] == ids(400)
    assert (
        sum(1 for row in everything if row.get("error") and row["error"]["type"] == "cancelled") == cancelled
    )


def test_mixed_hardware_any_goes_to_both_and_nf4_only_to_nf4(
    stack: Stack, tmp_path: Path, master: Path
) -> None:
    """A job on ``any`` is served by both the fp32 and the nf4 worker (both names and modes appear
    in its results and in status); a job with ``--mode nf4`` only by the nf4 worker; a job with
    ``--mode fp32`` only by the fp32 worker."""
    r = stack.server.client()
    prompts = take(master, 60, tmp_path / "in.jsonl")
    both = submit(stack.url, prompts, "--chunk-size", "2")
    only_nf4 = submit(stack.url, prompts, "--chunk-size", "2", "--mode", "nf4")
    only_fp32 = submit(stack.url, prompts, "--chunk-size", "2", "--mode", "fp32")
    for job in (both, only_nf4, only_fp32):
        assert wait_final(r, job) == "completed"

    got, _ = collect(stack.url, both, tmp_path / "both.jsonl")
    assert [row["id"] for row in got] == ids(60) and all(row["status"] == "ok" for row in got)
    assert {(row["worker"], row["mode"]) for row in got} == {("cpu-a", "fp32"), ("nf4-b", "nf4")}
    assert set(status_json(stack.url, both)["workers"]) == {"cpu-a", "nf4-b"}

    got, _ = collect(stack.url, only_nf4, tmp_path / "nf4.jsonl")
    assert [row["id"] for row in got] == ids(60)
    assert {(row["worker"], row["mode"], row["status"]) for row in got} == {("nf4-b", "nf4", "ok")}
    assert set(status_json(stack.url, only_nf4)["workers"]) == {"nf4-b"}

    got, _ = collect(stack.url, only_fp32, tmp_path / "fp32.jsonl")
    assert {(row["worker"], row["mode"], row["status"]) for row in got} == {("cpu-a", "fp32", "ok")}


def test_resubmitting_the_same_job_id_does_no_duplicate_work(
    stack: Stack, tmp_path: Path, master: Path
) -> None:
    """The same file submitted again with the same ``--job-id`` after the job completed: the
    producer says it resumed with 0 chunks, nothing is enqueued, the collected output is byte for
    byte the same, and the worker never runs a chunk of that job again (its ``chunk_done`` events
    stay at 10 after a later job on the same queue has been served)."""
    r = stack.server.client()
    prompts = take(master, 40, tmp_path / "in.jsonl")
    job = submit(stack.url, prompts, "--chunk-size", "4", "--mode", "fp32", "--job-id", "resub-1")
    assert job == "resub-1" and wait_final(r, job) == "completed"
    first, _ = collect(stack.url, job, tmp_path / "first.jsonl")
    before = log_events(stack.fp32.log_path, "chunk_done", job=job)
    assert len(before) == 10

    same = ["--profile", PROFILE, "--chunk-size", "4", "--job-id", job, "--mode", "fp32"]  # as first given
    again = genq(stack.url, "submit", str(prompts), *same)
    assert again.stdout.split()[-1] == job
    assert "resumed 40 items in 0 chunks (0 pending)" in again.stderr
    assert r.llen(f"genq.{PROFILE}.fp32") == 0
    # a later job on the same queue: once it is served, anything enqueued before it was too
    later = submit(stack.url, take(master, 4, tmp_path / "later.jsonl"), "--mode", "fp32")
    assert wait_final(r, later) == "completed"
    assert log_events(stack.fp32.log_path, "chunk_done", job=job) == before
    assert not log_events(stack.nf4.log_path, "chunk_done", job=job)
    second, _ = collect(stack.url, job, tmp_path / "second.jsonl")
    assert second == first
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()
    assert set(attempts(r, job).values()) == {1}


def test_an_any_jobs_chunks_on_a_killed_nf4_workers_queue_run_on_the_fp32_worker(
    stack: Stack, tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """The only nf4 worker is SIGKILLed while chunks of an ``any`` job wait on the nf4 queue: the
    fp32 worker's next heartbeat gives them back to the job (``stranded_chunks_returned``) and
    runs them, so the job completes, every item once in input order (the fp32 worker's with the
    clean run's text); nothing is left on the nf4 queue.  (Without the give-back they would wait
    there for an nf4 worker that never comes, and the job would never end.)  Last of the stack's
    tests: it kills the stack's nf4 worker."""
    r = stack.server.client()
    nf4_queue = f"genq.{PROFILE}.nf4"
    job = submit(stack.url, take(master, 200, tmp_path / "in.jsonl"), "--chunk-size", "2")
    wait_for(
        lambda: job_counts(r, job)["succeeded"] >= 10 and r.llen(nf4_queue) > 0, timeout=60, what="nf4 queue"
    )
    assert not log_events(stack.fp32.log_path, "stranded_chunks_returned")  # nf4 alive: none
    stack.nf4.kill()
    stranded = r.llen(nf4_queue)
    assert wait_final(r, job, timeout=90) == "completed", (stranded, r.llen(nf4_queue))
    returned = log_events(stack.fp32.log_path, "stranded_chunks_returned")
    assert returned and sum(int(str(e["messages"])) for e in returned) >= 1, stranded
    assert r.llen(nf4_queue) == 0
    got, _ = collect(stack.url, job, tmp_path / "out.jsonl")
    assert [row["id"] for row in got] == ids(200) and all(row["status"] == "ok" for row in got)
    fp32 = [row for row in got if row["mode"] == "fp32"]  # nf4's quantised weights say other things
    assert fp32 and all(row["text"] == reference[row["id"]] for row in fp32)


# --- expiry ------------------------------------------------------------------------------------------


def test_expired_before_any_worker_runs(redis_server: RedisServer, tmp_path: Path, master: Path) -> None:
    """Jobs submitted with ``--expires-in 2`` and no worker running until after that.  A worker
    started afterwards closes every item of the ``any`` job as ``expired`` without generating one;
    the ``nf4`` job, which no worker here serves, is expired by `genq status` itself.  Both end
    ``expired`` with exact counts; collect writes nothing unless ``--all``."""
    r = redis_server.client()
    prompts = take(master, 40, tmp_path / "in.jsonl")
    job = submit(redis_server.url, prompts, "--chunk-size", "4", "--expires-in", "2")
    orphan = submit(redis_server.url, prompts, "--chunk-size", "4", "--expires-in", "2", "--mode", "nf4")
    deadline = max(json.loads(r.hget(f"genq:job:{j}", "spec") or "{}")["expires_at"] for j in (job, orphan))
    wait_for(lambda: time.time() > deadline + 0.2, timeout=30, what="expiry time")
    assert job_counts(r, job)["status"] == "queued" and job_counts(r, orphan)["status"] == "queued"

    worker = WorkerProcess(redis_server.url, tmp_path / "late.log", name="late", env=FAST).start()
    try:
        assert wait_final(r, job, timeout=60) == "expired"
        wait_for(lambda: r.llen(QUEUE_ANY) == 0, timeout=30, what="the queue drained")
    finally:
        worker.stop()
    assert job_counts(r, job) == stored("expired", total=40, expired=40)
    assert not log_events(worker.log_path, "chunk_done", job=job)
    assert r.hgetall(f"genq:job:{job}:workers") == {}

    # no worker ever looked at the nf4 job: the producer's status check expires it
    assert job_counts(r, orphan)["status"] == "queued"
    state = status_json(redis_server.url, orphan)
    assert state["status"] == "expired" and state["counts"] == counts(total=40, expired=40)

    for j in (job, orphan):
        got, err = collect(redis_server.url, j, tmp_path / f"{j}.jsonl")
        assert got == [] and "wrote 0 results" in err and "0 pending; status expired" in err
        everything, _ = collect(redis_server.url, j, tmp_path / f"{j}-all.jsonl", "--all")
        assert [row["id"] for row in everything] == ids(40)
        assert {(row["status"], row["error"]["type"]) for row in everything} == {("error", "expired")}


# --- embedded run: SIGKILL and resume ---------------------------------------------------------------


def test_embedded_run_killed_mid_run_resumes_from_its_output(
    tmp_path: Path, master: Path, reference: dict[str, str]
) -> None:
    """`genq run` without a broker, SIGKILLed while it writes results (chunks made slow), then run
    again: the second run reports exactly the rows the first one finished as resumed, generates
    only the rest, and the final output has all 60 items once, in order, with the clean run's
    texts."""
    prompts = take(master, 60, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "producer.cli", "run", str(prompts), "-o", str(out)]
    args += ["--profile", PROFILE, "--chunk-size", "4"]
    env = env_for(None, GENQ_FAULT_SLOW_MS="200")
    env.pop("GENQ_BROKER_URL", None)
    first = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= 12, timeout=120, what="rows")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    partial = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    kept = len(partial)
    assert 12 <= kept < 60, kept
    assert len({r["id"] for r in partial}) == kept

    second = genq(None, "run", str(prompts), "-o", str(out), "--profile", PROFILE, "--chunk-size", "4")
    match = re.search(r"done: (\d+) ok, (\d+) errors, (\d+) resumed", second.stderr)
    assert match is not None, second.stderr[-2000:]
    assert (int(match[1]), int(match[2]), int(match[3])) == (60, 0, kept)
    got = rows(out)
    assert_exactly_once_ok(got, 60, reference)
    before = {r["id"]: r for r in partial}
    assert all(r == before[r["id"]] for r in got if r["id"] in before)  # kept rows are not redone


# --- soak --------------------------------------------------------------------------------------------


def run_soak(items: int, kills: int, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "scripts/soak.py", "--items", str(items), "--kills", str(kills), "--json"],
        cwd=REPO,
        env=env_for(None),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert report["kills"] == kills and report["lost"] == 0 and report["duplicates"] == 0
    assert report["in_order"] is True and report["ok"] == items and report["errored"] == 0
    assert report["status"] == "completed" and report["passed"] is True
    # counted from the worker's events: every item written once (a kill may fall between a write
    # and its log line), and no more generated than was kept, beyond what the kills interrupted
    assert report["written_items"] + report["written_unlogged"] == items
    assert report["written_unlogged"] <= 8 * kills and report["wasted_token_ratio"] is not None
    # each kill that caught unwritten items cost one extra delivery of its chunk (the same chunk
    # may be caught twice); nothing else was delivered twice
    caught = sum(1 for n in report["items_in_flight_at_kills"] if n)
    assert caught >= 1 and caught <= report["extra_deliveries"] <= kills
    assert 2 <= report["max_attempts"] <= kills + 1
    return report


def test_soak_short() -> None:
    """scripts/soak.py end to end, small: 120 items, 2 SIGKILLs, nothing lost or duplicated."""
    run_soak(120, 2, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_soak_full() -> None:
    """scripts/soak.py as documented: 1,000 items, 10 SIGKILLs, nothing lost or duplicated."""
    run_soak(1000, 10, timeout=1100)
