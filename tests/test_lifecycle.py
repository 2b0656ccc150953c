"""A job's whole life against a real Redis and the real `genq` CLI: what a rerun may resume,
submits that leave a job or nothing, concurrent submits, delete and prune, cancel as a count,
retry of retryable errors only, Redis out of memory or unreachable, bad output paths."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import REPO, RedisServer, env_for, genq, rows, wait_for, write_prompts
from worker.core.schema import ErrorInfo, error_result
from worker.core.settings import Settings
from worker.store import RedisStore

PROFILE = "tiny-random"
QUEUE = f"genq.{PROFILE}.any"


def job_keys(r: redis.Redis, job_id: str) -> list[str]:
    return sorted(str(k) for k in r.scan_iter(match=f"genq:job:{job_id}*", count=1000))


def all_job_keys(r: redis.Redis) -> list[str]:
    return sorted(str(k) for k in r.scan_iter(match="genq:job:*", count=1000))


def task_ids(r: redis.Redis, queue: str = QUEUE) -> list[str]:
    """The messages waiting: on the queue, and in the jobs' backlogs (not dispatched yet)."""
    waiting = list(r.lrange(queue, 0, -1))
    for key in r.scan_iter(match="genq:job:*:backlog", count=1000):
        waiting += r.lrange(key, 0, -1)
    return [json.loads(raw)["headers"]["id"] for raw in waiting]


def store_for(url: str) -> RedisStore:
    return RedisStore(settings=Settings.from_env({"GENQ_BROKER_URL": url}))


def write_lines(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def message_indices(raw: str) -> list[int]:
    """The item indices a task message carries (its body: base64 of [args, kwargs, embed])."""
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return list(body[0][0]["indices"])


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("genq: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# --- embedded runs: resume only what belongs ---------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


def prompts(tag: str, n: int = 6) -> list[dict[str, object]]:
    return [{"id": f"q{i}", "prompt": f"{tag} fever {i} and cough", "max_new_tokens": 5} for i in range(n)]


def test_rerun_with_other_prompts_under_the_same_ids_regenerates_them(embedded: Path) -> None:
    """out.jsonl is the complete output of A; B has the same ids and other prompts.  Running B
    into out.jsonl reuses nothing: every row answers B (as a fresh run of B does), and the
    report names the regeneration.  Changing one line regenerates that item only."""
    a = write_lines(embedded / "a.jsonl", prompts("alpha"))
    b = write_lines(embedded / "b.jsonl", prompts("beta"))
    out, fresh = embedded / "out.jsonl", embedded / "fresh-b.jsonl"
    genq(None, "run", str(a), "-o", str(out), "--profile", PROFILE)
    genq(None, "run", str(b), "-o", str(fresh), "--profile", PROFILE)
    text_a = {r["id"]: r["text"] for r in rows(out)}
    proc = genq(None, "run", str(b), "-o", str(out), "--profile", PROFILE)
    assert "0 resumed" in proc.stderr and "6 regenerated because their request changed" in proc.stderr
    got = {r["id"]: r["text"] for r in rows(out)}
    assert got == {r["id"]: r["text"] for r in rows(fresh)}
    assert got != text_a  # the tiny model answers alpha and beta differently
    # one changed line: one item generated again, five kept
    changed = prompts("beta")
    changed[3]["prompt"] = "gamma headache"
    c = write_lines(embedded / "c.jsonl", changed)
    proc = genq(None, "run", str(c), "-o", str(out), "--profile", PROFILE)
    assert "5 resumed" in proc.stderr and "1 regenerated" in proc.stderr
    assert [r["id"] for r in rows(out)] == [f"q{i}" for i in range(6)]


def test_output_equal_to_input_is_refused_and_the_input_kept(embedded: Path) -> None:
    src = write_lines(embedded / "same.jsonl", prompts("same"))
    before = src.read_bytes()
    message = one_error_line(genq(None, "run", str(src), "-o", str(src), "--profile", PROFILE, check=False))
    assert "it is the input file" in message
    assert src.read_bytes() == before


def test_one_output_never_mixes_formats(embedded: Path) -> None:
    src = write_lines(embedded / "fmt.jsonl", prompts("fmt", 3))
    out = embedded / "fmt-out.jsonl"
    genq(None, "run", str(src), "-o", str(out), "--profile", PROFILE)
    before = out.read_bytes()
    proc = genq(
        None, "run", str(src), "-o", str(out), "--profile", PROFILE, "--format", "openai", check=False
    )
    message = one_error_line(proc)
    assert "holds native rows" in message and "--format native" in message
    assert out.read_bytes() == before


def test_an_output_genq_did_not_write_is_not_resumed(embedded: Path) -> None:
    src = write_lines(embedded / "foreign.jsonl", prompts("foreign", 2))
    out = embedded / "foreign-out.jsonl"
    out.write_text(json.dumps({"id": "q0", "status": "ok", "text": "not from genq"}) + "\n")
    message = one_error_line(genq(None, "run", str(src), "-o", str(out), "--profile", PROFILE, check=False))
    assert "genq run did not write" in message and "another -o" in message


@pytest.mark.parametrize("command", ["run", "collect"])
def test_bad_output_paths_fail_before_any_work(embedded: Path, command: str) -> None:
    """A directory, a missing folder and an unwritable place: one line naming the path and why,
    exit 2, and (for run) no model loaded."""
    src = write_lines(embedded / f"paths-{command}.jsonl", prompts("paths", 2))
    cases = {
        str(embedded): "it is a directory",
        str(embedded / "no" / "such" / "out.jsonl"): "does not exist",
        "/proc/genq-out.jsonl": "cannot write results to /proc/genq-out.jsonl",
    }
    for target, why in cases.items():
        args = ["run", str(src)] if command == "run" else ["collect", "some-job"]
        started = time.monotonic()
        proc = (
            genq(None, *args, "-o", target, "--profile", PROFILE, check=False)
            if command == "run"
            else genq("redis://127.0.0.1:1/0", *args, "-o", target, check=False)
        )
        message = one_error_line(proc)
        assert target in message and why in message, message
        assert time.monotonic() - started < 20  # refused before loading anything
        assert "mode_chosen" not in proc.stderr


# --- distributed: a submit leaves a job or nothing ------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", appendonly=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _default_sigint() -> None:
    # a shell's background job ignores SIGINT, and Python then never turns it into Ctrl-C: give the
    # child the disposition a terminal's foreground process has
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def submit_proc(url: str, path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "submit", str(path), "--profile", PROFILE, *args],
        cwd=REPO,
        env=env_for(url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def test_job_id_with_another_file_is_refused(server: RedisServer, tmp_path: Path) -> None:
    a = write_prompts(tmp_path / "a.jsonl", 20)
    b = write_prompts(tmp_path / "b.jsonl", 20, max_new_tokens=9)
    genq(server.url, "submit", str(a), "--profile", PROFILE, "--job-id", "mine")
    before = server.client().llen(QUEUE)
    message = one_error_line(
        genq(server.url, "submit", str(b), "--profile", PROFILE, "--job-id", "mine", check=False)
    )
    assert "job mine exists with a different input" in message
    assert server.client().llen(QUEUE) == before


def test_interrupted_submit_is_resumed_by_the_same_command(server: RedisServer, tmp_path: Path) -> None:
    """SIGINT in the middle of a big submit: the job id was said first, every key it wrote has a
    TTL, and the same command then finishes it: one job, each chunk enqueued exactly once."""
    src = write_prompts(tmp_path / "big.jsonl", 150_000)  # seconds of work left when the signal lands
    r = server.client()
    proc = submit_proc(server.url, src, "--chunk-size", "16")
    first = proc.stderr.readline() if proc.stderr else ""
    assert first.startswith("job "), first
    job_id = first.split()[1]
    wait_for(lambda: int(r.hget(f"genq:job:{job_id}", "inputs_written") or 0) > 0, timeout=60, interval=0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"job {job_id} is partial" in err and "Traceback" not in err, err
    keys = job_keys(r, job_id)
    assert keys and all(r.ttl(k) > 0 for k in keys), {k: r.ttl(k) for k in keys}
    assert r.hget(f"genq:job:{job_id}", "status") == "submitting"
    listing = json.loads(genq(server.url, "status", "--json").stdout)
    assert [(j["job_id"], j["label"]) for j in listing] == [(job_id, "partial")]

    again = genq(server.url, "submit", str(src), "--profile", PROFILE, "--chunk-size", "16")
    assert again.stdout.strip() == job_id
    ids = task_ids(r)
    assert len(ids) == 9375 and len(set(ids)) == 9375  # 150,000 / 16, each once
    assert all(r.ttl(k) == -1 for k in job_keys(r, job_id) if not k.endswith(":submitter"))
    assert {k.split(":")[2] for k in all_job_keys(r)} == {job_id}
    assert r.hget(f"genq:job:{job_id}", "status") == "queued"


def test_concurrent_submits_of_one_job_enqueue_each_chunk_once(server: RedisServer, tmp_path: Path) -> None:
    src = write_prompts(tmp_path / "twice.jsonl", 20_000)
    procs = [submit_proc(server.url, src, "--job-id", "twice") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    ids = task_ids(server.client())
    assert len(ids) == 1250 and len(set(ids)) == 1250
    assert any("waiting for it" in err for _, err in outs)  # the second one waited, then resumed


def test_delete_removes_every_key_and_message(server: RedisServer, tmp_path: Path) -> None:
    r = server.client()
    keep = genq(server.url, "submit", str(write_prompts(tmp_path / "keep.jsonl", 32)), "--profile", PROFILE)
    gone = genq(
        server.url,
        "submit",
        str(write_prompts(tmp_path / "gone.jsonl", 48, prefix="g")),
        "--profile",
        PROFILE,
    )
    keep_id, gone_id = keep.stdout.strip(), gone.stdout.strip()
    proc = genq(server.url, "delete", gone_id)
    assert "3 waiting messages" in proc.stderr
    assert job_keys(r, gone_id) == [] and gone_id not in r.zrange("genq:jobs", 0, -1)
    assert {i.split(":")[0] for i in task_ids(r)} == {keep_id}
    assert job_keys(r, keep_id)


def test_redis_out_of_memory_during_submit_leaves_nothing(server: RedisServer, tmp_path: Path) -> None:
    r = server.client()
    r.config_set("maxmemory", "4mb")
    r.config_set("maxmemory-policy", "noeviction")
    proc = genq(
        server.url,
        "submit",
        str(write_prompts(tmp_path / "huge.jsonl", 60_000)),
        "--profile",
        PROFILE,
        check=False,
    )
    message = one_error_line(proc)
    assert "out of memory" in message and "maxmemory" in message
    assert all_job_keys(r) == [] and r.llen(QUEUE) == 0
    # and the next submit (smaller) goes through
    r.config_set("maxmemory", "0")
    genq(server.url, "submit", str(write_prompts(tmp_path / "small.jsonl", 16)), "--profile", PROFILE)


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "some-job"],
        ["workers"],
        ["cancel", "j"],
        ["delete", "j"],
        ["collect", "j", "-o", "x.jsonl"],
    ],
)
def test_unreachable_redis_fails_fast_in_one_line(args: list[str], tmp_path: Path) -> None:
    started = time.monotonic()
    proc = genq("redis://:hunter2@127.0.0.1:1/0", *args, check=False)
    took = time.monotonic() - started
    message = one_error_line(proc)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in message and "hunter2" not in proc.stderr
    assert took <= 5.0, f"{took:.1f} s"


def test_submit_to_unreachable_redis_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    src = write_prompts(tmp_path / "x.jsonl", 4)
    message = one_error_line(
        genq("redis://127.0.0.1:1/0", "submit", str(src), "--profile", PROFILE, check=False)
    )
    assert "cannot reach Redis" in message and time.monotonic() - started <= 5.0


def test_a_worker_without_redis_says_so_before_loading(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "start", "--profile", PROFILE, "--mode", "fp32"],
            cwd=REPO,
            env=env_for("redis://127.0.0.1:1/0", GENQ_LOG_FORMAT="json"),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "cannot reach Redis" in log.read_text(), timeout=30, what="the warning")
        text = log.read_text()
        assert "redis_unreachable" in text and "mode_chosen" not in text and "engine_ready" not in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- the end of a job ---------------------------------------------------------------------------


def test_cancel_stores_a_count_not_a_row_per_item(server: RedisServer, tmp_path: Path) -> None:
    r = server.client()
    job = genq(
        server.url, "submit", str(write_prompts(tmp_path / "c.jsonl", 200)), "--profile", PROFILE
    ).stdout.strip()
    reply = json.loads(genq(server.url, "cancel", job).stdout)
    assert (
        reply["status"] == "cancelled" and reply["counts"]["cancelled"] == 200
    )  # nothing ran: ended at once
    assert r.hlen(f"genq:job:{job}:results") == 0
    out = tmp_path / "all.jsonl"
    proc = genq(server.url, "collect", job, "-o", str(out), "--all")
    assert "status cancelled" in proc.stderr
    got = rows(out)
    assert len(got) == 200 and {g["error"]["type"] for g in got} == {"cancelled"}


def test_retry_reruns_retryable_errors_and_keeps_the_first_finish(
    server: RedisServer, tmp_path: Path
) -> None:
    """worker_lost may pass next time; context_length_exceeded never does: `genq retry` re-enqueues
    the first, `--all-errors` both.  The job's first finish time (and its tok/s) stay."""
    job = genq(
        server.url, "submit", str(write_prompts(tmp_path / "r.jsonl", 3)), "--profile", PROFILE
    ).stdout.strip()
    backlog = f"genq:job:{job}:backlog"  # an any job's chunks wait here until a worker dispatches
    server.client().delete(QUEUE, backlog)  # no worker here: the test plays its part
    store = store_for(server.url)
    items = store.items(job, [0, 1, 2])
    ok = store.items(job, [2])[0]
    from worker.core.schema import ItemResult, Usage

    done = ItemResult(
        index=2, id=ok.id, line=ok.line, status="ok", text="x", usage=Usage(completion_tokens=30)
    )
    lost = error_result(items[0], ErrorInfo(type="worker_lost", message="died"))
    long = error_result(items[1], ErrorInfo(type="context_length_exceeded", message="too long"))
    store.record(job, [done, lost, long])
    first = store.state(job)
    assert first.final and first.first_finished_at is not None
    time.sleep(1.1)
    assert "re-enqueued 1 errored items" in genq(server.url, "retry", job).stderr
    assert [message_indices(raw) for raw in server.client().lrange(backlog, 0, -1)] == [[0]]
    again = store.state(job)
    assert again.status == "in_progress" and again.first_finished_at == first.first_finished_at
    assert again.tokens_per_second == pytest.approx(first.tokens_per_second)
    assert "re-enqueued 1 errored items" in genq(server.url, "retry", job, "--all-errors").stderr


def test_prune_deletes_old_finished_and_partial_jobs_only(server: RedisServer, tmp_path: Path) -> None:
    r = server.client()
    old = genq(
        server.url, "submit", str(write_prompts(tmp_path / "o.jsonl", 4)), "--profile", PROFILE
    ).stdout.strip()
    genq(server.url, "cancel", old)
    new = genq(
        server.url, "submit", str(write_prompts(tmp_path / "n.jsonl", 4, prefix="n")), "--profile", PROFILE
    ).stdout.strip()
    r.hset(f"genq:job:{old}", "finished_at", time.time() - 3600)
    assert f"would delete {old}" in genq(server.url, "prune", "--older-than", "30m", "--dry-run").stderr
    assert job_keys(r, old)
    proc = genq(server.url, "prune", "--older-than", "30m")
    assert "deleted 1 jobs" in proc.stderr
    assert job_keys(r, old) == [] and job_keys(r, new)
    assert one_error_line(genq(server.url, "prune", "--older-than", "soon", check=False)).endswith(
        "(e.g. 7d)"
    )


def test_status_watch_says_the_connection_is_lost_and_counts_down(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    server = redis_server  # append-only file on: the job survives the restart
    job = genq(
        server.url, "submit", str(write_prompts(tmp_path / "w.jsonl", 4)), "--profile", PROFILE
    ).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "status", job, "--watch"],
        cwd=REPO,
        env=env_for(server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    time.sleep(2)
    server.stop()
    wait_for(lambda: any("connection lost" in line and "retrying in" in line for line in lines), timeout=30)
    server.start()
    genq(server.url, "cancel", job)
    proc.wait(60)
    assert proc.returncode == 0 and "Traceback" not in "".join(lines)
