"""`genq collect --follow` against a real Redis: real collector processes (killed with SIGKILL and
started again), results written through the store's own ``record`` script at a steady rate as
a fleet would (``bench.drain.feed``), a real worker for a retry's items."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.drain import feed
from bench.submit import write_input
from producer import Client
from producer.spool import spool_folder
from tests.helpers import REPO, RedisServer, WorkerProcess, env_for, genq, rows, wait_for


def submit(url: str, src: Path, *extra: str) -> str:
    return genq(url, "submit", str(src), "--profile", "tiny-random", *extra).stdout.strip().splitlines()[-1]


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_collector_left() -> Iterator[None]:
    """A failed test leaves no collector running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def follower(url: str, job_id: str, out: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "collect", job_id, "-o", str(out), "--follow", *extra],
        cwd=REPO,
        env=env_for(url, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def following(r: redis.Redis, job_id: str) -> None:
    """Until a collector holds the job's follow lease (it has started)."""
    wait_for(lambda: r.exists(f"genq:job:{job_id}:follower"), timeout=120, what="a follower's lease")


def drained(r: redis.Redis, job_id: str) -> int:
    return int(r.bitcount(f"genq:job:{job_id}:drained"))


@pytest.fixture
def feeding() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(timeout=120)


def start_feed(threads: list[threading.Thread], *args: object, **kw: object) -> threading.Thread:
    t = threading.Thread(target=feed, args=args, kwargs=kw, daemon=True)  # type: ignore[arg-type]
    t.start()
    threads.append(t)
    return t


def test_follower_killed_twice_resumes_complete_ordered_once(
    redis_server: RedisServer, tmp_path: Path, feeding: list[threading.Thread]
) -> None:
    """Two SIGKILLs mid-job, each time started again at once: the file is complete, in input
    order, each item once, byte for byte what a plain collect of a twin job writes; the drained
    job's results and inputs are out of Redis and its counts are unchanged."""
    url, n = redis_server.url, 4000
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    job, twin = submit(url, src), submit(url, src, "--new")
    feed(url, twin, n, rate=float("inf"))
    plain = tmp_path / "plain.jsonl"
    genq(url, "collect", twin, "-o", str(plain))

    out = tmp_path / "out.jsonl"
    r = redis_server.client()
    proc = follower(url, job, out)
    following(r, job)
    start_feed(feeding, url, job, n, rate=250.0)
    for kill in range(2):
        seen = drained(r, job)
        wait_for(lambda seen=seen: drained(r, job) >= seen + 300, timeout=120, what="more items drained")  # type: ignore[misc]
        assert r.hget(f"genq:job:{job}", "status") != "completed", "the job ended before the kill"
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"kill {kill + 1}"
        proc = follower(url, job, out)  # the lease of a dead collector of this machine is taken over
    err = finish(proc)
    assert f"wrote {n} results" in err and "status completed" in err
    got = rows(out)
    assert [row["id"] for row in got] == [f"q{i:08d}" for i in range(n)]
    assert out.read_bytes() == plain.read_bytes()
    assert not spool_folder(out).exists()
    assert r.hlen(f"genq:job:{job}:results") == 0 and r.hkeys(f"genq:job:{job}:inputs") == ["b0"]
    assert r.ttl(f"genq:job:{job}:drained") > 0  # kept as long as the finished job
    state, twin_state = (json.loads(genq(url, "status", j, "--json").stdout) for j in (job, twin))
    assert state["counts"] == twin_state["counts"] and state["counts"]["succeeded"] == n
    batch = json.loads(genq(url, "status", job, "--json", "--format", "openai").stdout)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert batch["endpoint"] == "/v1/completions"  # item 0's input stays to say so
    assert batch["output_file_id"] == str(out.resolve())
    # a plain collect of the drained job says where its results went
    refused = genq(url, "collect", job, "-o", str(tmp_path / "again.jsonl"), check=False)
    assert refused.returncode == 2 and "--follow" in refused.stderr and str(out.resolve()) in refused.stderr


@pytest.mark.parametrize("window", ["2:read", "2:written"])
def test_a_collector_killed_around_its_write_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, feeding: list[threading.Thread], window: str
) -> None:
    """The windows that matter (a test-only fault: SIGKILL at its 2nd page): results read but
    not written (they must still be in Redis), or a segment fsynced whose results are still in
    Redis (confirmed again on restart).  Started again, the file has each item once."""
    url, n = redis_server.url, 1500
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    job = submit(url, src)
    out = tmp_path / "out.jsonl"
    r = redis_server.client()
    dying = follower(url, job, out, GENQ_FAULT_FOLLOW_KILL_AT=window)
    following(r, job)  # then the results come a page at a time
    start_feed(feeding, url, job, n, rate=300.0)
    dying.communicate(timeout=120)
    assert dying.returncode == -signal.SIGKILL
    assert r.hget(f"genq:job:{job}", "status") != "completed", "the job ended before the kill"
    err = finish(follower(url, job, out))
    assert f"wrote {n} results" in err
    assert [row["id"] for row in rows(out)] == [f"q{i:08d}" for i in range(n)]
    assert r.hlen(f"genq:job:{job}:results") == 0


def test_retry_after_drain_merges_the_new_results(redis_server: RedisServer, tmp_path: Path) -> None:
    """Errors drained to the output stay retryable: `genq retry` re-runs them on a real worker
    (their inputs were kept), and the same `collect --follow` merges the new results in place
    of the errors (the file stays in input order, each item once)."""
    url, n, bad = redis_server.url, 200, {3, 77, 150}
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    job = submit(url, src)
    feed(url, job, n, rate=float("inf"), errors=bad)
    out = tmp_path / "out.jsonl"
    err = finish(follower(url, job, out))
    assert "kept" in err and spool_folder(out).exists()
    first = rows(out)
    assert [row["status"] == "error" for row in first] == [i in bad for i in range(n)]
    r = redis_server.client()
    # drained errors stay in Redis for a retry, out of the results hash a follower scans
    assert r.hlen(f"genq:job:{job}:results") == 0
    assert sorted(map(int, r.hkeys(f"genq:job:{job}:drained_errors"))) == sorted(bad)
    # their inputs are kept apart: every block of inputs but the first left Redis with its items
    assert sorted(map(int, r.hkeys(f"genq:job:{job}:kept_inputs"))) == sorted(bad)
    assert r.hkeys(f"genq:job:{job}:inputs") == ["b0"]

    retried = genq(url, "retry", job)
    assert f"re-enqueued {len(bad)}" in retried.stderr
    elsewhere = follower(url, job, tmp_path / "elsewhere.jsonl")  # its spool is beside out.jsonl
    _, refused = elsewhere.communicate(timeout=60)
    assert elsewhere.returncode == 2 and f"follow into {out.resolve()}" in refused
    worker = WorkerProcess(url, tmp_path / "worker.log", name="drain-retry").start()
    try:
        err = finish(follower(url, job, out))
    finally:
        worker.stop()
    assert f"wrote {n} results" in err and "status completed" in err
    got = rows(out)
    assert [row["id"] for row in got] == [f"q{i:08d}" for i in range(n)]
    assert all(row["status"] == "ok" for row in got)
    assert [row for i, row in enumerate(got) if i not in bad] == [
        row for i, row in enumerate(first) if i not in bad
    ]
    assert {got[i]["worker"] for i in bad} == {"drain-retry"}
    state = json.loads(genq(url, "status", job, "--json").stdout)
    assert state["counts"]["succeeded"] == n and state["counts"]["errored"] == 0
    assert not spool_folder(out).exists()
    assert r.hlen(f"genq:job:{job}:drained_errors") == 0


def test_cancel_during_follow(
    redis_server: RedisServer, tmp_path: Path, feeding: list[threading.Thread]
) -> None:
    """A cancel while the collector follows: it ends with the job, the output holds what was
    done (with --all, a cancelled row for each of the rest), and the counts agree."""
    url, n = redis_server.url, 3000
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    job = submit(url, src)
    stop = threading.Event()
    start_feed(feeding, url, job, n, rate=200.0, stop=stop)
    out = tmp_path / "out.jsonl"
    proc = follower(url, job, out, "--all")
    r = redis_server.client()
    wait_for(lambda: drained(r, job) >= 200, timeout=120, what="items drained")
    genq(url, "cancel", job)
    err = finish(proc)
    stop.set()
    assert "status cancelled" in err
    state = json.loads(genq(url, "status", job, "--json").stdout)["counts"]
    assert state["succeeded"] > 0 and state["cancelled"] > 0
    assert state["succeeded"] + state["cancelled"] == n
    got = rows(out)
    assert [row["id"] for row in got] == [f"q{i:08d}" for i in range(n)]
    done = [row for row in got if row["status"] == "ok"]
    cancelled = [row for row in got if row["status"] == "error"]
    assert len(done) == state["succeeded"] and len(cancelled) == state["cancelled"]
    assert {row["error"]["type"] for row in cancelled} == {"cancelled"}


def test_a_second_follower_is_refused_while_the_first_lives(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = redis_server.url
    src = tmp_path / "in.jsonl"
    write_input(src, 100)
    job = submit(url, src)
    first = follower(url, job, tmp_path / "a.jsonl")
    r = redis_server.client()
    following(r, job)
    second = follower(url, job, tmp_path / "b.jsonl")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2 and "already followed" in err and str(first.pid) in err
    assert first.poll() is None
    time.sleep(2 * 2.0 + 1)  # past a renewal or two: still held by the first
    assert r.get(f"genq:job:{job}:follower").split("|")[1] == str(first.pid)
    first.kill()
    first.communicate()
    # the Python API follows now (the dead collector's lease is taken over at once)
    feed(url, job, 100, rate=float("inf"))
    results = Client(url).job(job).results(follow=True)
    assert sorted(res.index for res in results) == list(range(100))
    assert r.hlen(f"genq:job:{job}:results") == 0 and not r.exists(f"genq:job:{job}:follower")


def test_drained_items_stay_done_for_late_writes(redis_server: RedisServer, tmp_path: Path) -> None:
    """A second delivery writing an item after it was drained changes nothing (first write wins
    across the drain): the count stays, the result does not come back into Redis."""
    url = redis_server.url
    src = tmp_path / "in.jsonl"
    write_input(src, 20)
    job = submit(url, src)
    feed(url, job, 20, rate=float("inf"))
    finish(follower(url, job, tmp_path / "out.jsonl"))
    assert feed(url, job, 20, rate=float("inf"), only=range(20)) == 0
    client = Client(url)
    assert client.store.done(job, list(range(20))) == set(range(20))
    state = client.job(job).status()
    assert state.counts.succeeded == 20 and client.store.r.hlen(f"genq:job:{job}:results") == 0


def test_submit_collect_to_submits_then_follows(redis_server: RedisServer, tmp_path: Path) -> None:
    """`genq submit FILE --collect-to OUT`: one command, the job submitted, followed to its end."""
    url, n = redis_server.url, 300
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    out = tmp_path / "out.jsonl"
    r = redis_server.client()

    def fleet() -> None:
        job = wait_for(lambda: r.zrange("genq:jobs", 0, -1), timeout=120, what="the job")[0]
        wait_for(lambda: r.hget(f"genq:job:{job}", "status") == "queued", timeout=120, what="the submit")
        feed(url, job, n, rate=300.0)

    t = threading.Thread(target=fleet, daemon=True)
    t.start()
    proc = genq(url, "submit", str(src), "--profile", "tiny-random", "--collect-to", str(out))
    t.join(timeout=60)
    job = proc.stdout.strip().splitlines()[-1]
    assert f"wrote {n} results to {out}" in proc.stderr
    assert [row["id"] for row in rows(out)] == [f"q{i:08d}" for i in range(n)]
    assert r.hlen(f"genq:job:{job}:results") == 0


def test_the_summary_counts_each_cancelled_item_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """Followed once with ``--all`` (a cancelled row for each item the cancel left; the spool is
    kept, the job had an error), then again without: the items left out are the job's cancelled
    count, once (the spool's cancelled rows are those same items), and the file leaves them out."""
    url, n = redis_server.url, 200
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    job = submit(url, src)
    feed(url, job, n, rate=float("inf"), only=range(100), errors={5})
    client = Client(url)
    client.job(job).cancel()
    state = client.job(job).status()  # settled: no worker runs a chunk of it
    assert (state.status, state.counts.cancelled) == ("cancelled", 100)
    out = tmp_path / "out.jsonl"
    every = client.collect(job, out, follow=True, include_unfinished=True)
    assert (every.written, every.ended) == (n, 0) and every.spool_kept is not None
    again = client.collect(job, out, follow=True)
    assert (again.written, again.ended) == (100, 100)
    assert [row["id"] for row in rows(out)] == [f"q{i:08d}" for i in range(100)]
