"""The job's state table (worker/core/lifecycle.py) and the combinations of lifecycle operations it
decides, against a real Redis (its own redis-server), the real store, producer and chunk runner
(in process, the real engine on the tiny model where items are generated):

* the table is complete, the Lua scripts' status literals are the Python enum's, and
  docs/OPERATIONS.md shows the table generated from the code;
* cancel, delete or a TTL lapse during a submit that is still storing inputs: the submit is
  refused in one line at its next step; no orphan job, no key without a TTL;
* retry of a cancelled or expired job: refused in one line naming why (the CLI: no traceback);
* a job id deleted and submitted again runs with its NEW spec and deadline on a long-lived
  worker's store (the spec cache is keyed by incarnation), and an old message is dropped;
* resuming with another priority, chunk size, mode or --skip-invalid: refused naming the option;
* a resumed partial submit publishes no chunk that workers already finished;
* delete while a chunk runs: the chunk ends quietly (no task failure), and no key is left;
* the fleet's and the follower's guarded steps: a `collect --follow` of a job deleted and submitted
  again drains nothing of the new incarnation; wasted tokens of another incarnation or of a gone job
  count nothing; a backup or a time box's hand-on of a cancelled job records no chunk.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client
from producer.submit import Submitter
from tests.helpers import REPO, RedisServer, genq
from worker.chunks import Outcome, process_chunk
from worker.core import lifecycle
from worker.core.errors import GenqError, JobNotFound, JobRefused, ShutdownRequested
from worker.core.lifecycle import ABSENT, STATES, TABLE, Event, Move, Refuse
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, ItemResult, Usage, error_result
from worker.core.states import ChunkOutcome, CountField, JobStatus
from worker.store import RedisStore
from worker.store.blocks import BLOCK
from worker.store.keys import JOBS_INDEX, all_job_keys, backlog_key, job_key, ring_key

PROFILE = "tiny-random"
QUEUE = f"genq.{PROFILE}.any"
LUA = REPO / "worker" / "store" / "lua"


# --- the table itself -----------------------------------------------------------------------------


def test_the_table_has_an_entry_for_every_state_and_event() -> None:
    assert set(TABLE) == set(STATES) == {ABSENT, *(str(s) for s in JobStatus)}
    for state, row in TABLE.items():
        assert set(row) == set(Event), state
        for event, entry in row.items():
            if isinstance(entry, Move):
                assert entry.to and set(entry.to) <= set(STATES), (state, event)
            else:
                assert isinstance(entry, Refuse) and "{job}" in entry.reason, (state, event)
    # what the store's guards are given: statuses only, never "absent"
    for event in Event:
        assert set(lifecycle.allowed(event)) <= {str(s) for s in JobStatus}


HASH_FIELDS = {
    "spec",
    "status",
    "inc",
    "total",
    *(str(f) for f in CountField),
    "prompt_tokens",
    "completion_tokens",
    "wasted_tokens",
    "wasted_items",
    "inputs_written",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "first_finished_at",
    "expires_at",
    "ending",
    "absent",
    "running",
    "handback",
    "take",
    "renew",
    "release",
    "route",
    "table",
    "string",
    "b",
}
"""Lower-case words the scripts may quote besides statuses: the job hash's fields, the guard's
``absent``, release.lua's two operations, follow_lease.lua's three, Lua's type names and the
prefix of a block of inputs' field (``b<n>``, worker/store/blocks.py)."""


def lua_literals() -> dict[str, set[str]]:
    return {p.name: set(re.findall(r"'([^'\n]*)'", p.read_text())) for p in sorted(LUA.glob("*.lua"))}


def test_lua_status_literals_are_the_python_enum() -> None:
    """Every lower-case word a script quotes is a status of the enum or a known field, a status
    compared with is one of the enum, and every status of the enum is spelled in some script."""
    statuses = {str(s) for s in JobStatus}
    seen: set[str] = set()
    for name, literals in lua_literals().items():
        words = {w for w in literals if re.fullmatch(r"[a-z_]+", w)}
        assert words <= statuses | HASH_FIELDS, (name, words - statuses - HASH_FIELDS)
        seen |= words & statuses
        text = (LUA / name).read_text()
        compared = set(re.findall(r"status\s*[~=]=\s*'([^']*)'", text))
        assert compared <= statuses, (name, compared - statuses)
    assert seen == statuses, statuses - seen


def test_operations_doc_shows_the_table_generated_from_the_code() -> None:
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    begin, end = "<!-- state table: generated by scripts/state_table.py -->", "<!-- end of state table -->"
    assert begin in doc and end in doc
    shown = doc.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == lifecycle.markdown().strip(), "run: .venv/bin/python scripts/state_table.py"


# --- a real Redis -------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", appendonly=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: RedisServer) -> Client:
    return Client(server.url)


def records(n: int, tag: str = "p") -> list[dict[str, Any]]:
    return [{"id": f"{tag}{i:05d}", "prompt": f"fever {i} and cough"} for i in range(n)]


class Gate:
    """Records that stop at item ``at`` until released (``reached`` is set when they do); with
    ``interrupt`` they raise KeyboardInterrupt there instead (Ctrl-C in the middle of a submit)."""

    def __init__(self, rows: list[dict[str, Any]], at: int, *, interrupt: bool = False) -> None:
        self.rows, self.at, self.interrupt = rows, at, interrupt
        self.reached, self.go = threading.Event(), threading.Event()

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for i, row in enumerate(self.rows):
            if i == self.at:
                if self.interrupt:
                    raise KeyboardInterrupt
                self.reached.set()
                assert self.go.wait(60)
            yield row


def submit_in_thread(client: Client, source: Iterable[Mapping[str, Any]], **kw: Any) -> dict[str, Any]:
    """Start ``client.submit`` in a thread; the returned dict gets ``error`` or ``job``."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["job"] = client.submit(source, profile=PROFILE, **kw)
        except GenqError as exc:
            out["error"] = exc

    out["thread"] = threading.Thread(target=go, daemon=True)
    out["thread"].start()
    return out


def job_keys(r: redis.Redis, job_id: str) -> list[str]:
    return [k for k in r.scan_iter(match=f"genq:job:{job_id}*") if not k.endswith(":submitter")]


def message_refs(r: redis.Redis, job_id: str, queue: str = QUEUE) -> list[ChunkRef]:
    """The chunk messages of ``job_id`` waiting in its backlog or on ``queue``."""
    refs = []
    for raw in [*r.lrange(backlog_key(job_id), 0, -1), *r.lrange(queue, 0, -1)]:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ref = ChunkRef.model_validate(body[0][0])
        if ref.job_id == job_id:
            refs.append(ref)
    return refs


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# --- (1) cancel while a submit is still storing inputs ----------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_cancel_or_expiry_during_a_submit_ends_the_job_and_refuses_the_submit(
    server: RedisServer, client: Client, how: str
) -> None:
    """``genq cancel`` (or ``--expires-in`` running out, seen by a status read) while the submit
    still stores inputs: the job ends with the items stored so far counted cancelled (expired),
    never ``completed`` with total 0, and the submit stops at its next page in one line."""
    r = server.client()
    gate = Gate(records(2500), at=1500)  # the first page (1,000 items) is stored, then it waits
    expires = {"expires_in": 1.0} if how == "expire" else {}
    started = time.time()
    run = submit_in_thread(client, gate, job_id="c1", chunk_size=16, **expires)
    assert gate.reached.wait(60)
    other = Client(server.url).job("c1")
    if how == "cancel":
        ended = other.cancel()
    else:
        time.sleep(max(0.0, started + 1.2 - time.time()))
        ended = other.status()
    word = "cancelled" if how == "cancel" else "expired"
    assert ended.status == word
    gate.go.set()
    run["thread"].join(60)
    assert isinstance(run.get("error"), JobRefused), run
    was = "was cancelled" if how == "cancel" else "expired"
    assert f"job c1 {was} during its submit" in one_line(run["error"])
    state = client.job("c1").status()
    assert state.status == word  # never "completed" with total 0
    assert (state.counts.total, getattr(state.counts, word), state.counts.pending) == (1000, 1000, 0)
    assert r.hlen(job_key("c1", "inputs")) == 1000 // BLOCK  # nothing of the second page was stored
    assert message_refs(r, "c1") == [] and "c1" not in client.store.ring(QUEUE)
    assert all(r.ttl(k) > 0 for k in job_keys(r, "c1"))  # an ended job expires after retention


# --- (2) delete, or the keys' TTL lapsing, during a submit --------------------------------------------


def test_delete_during_a_submit_leaves_nothing_and_the_same_submit_then_works(
    server: RedisServer, client: Client
) -> None:
    r = server.client()
    gate = Gate(records(2500), at=1500)
    run = submit_in_thread(client, gate, job_id="d2", chunk_size=16)
    assert gate.reached.wait(60)
    Client(server.url).delete("d2")
    gate.go.set()
    run["thread"].join(60)
    assert isinstance(run.get("error"), JobNotFound), run
    assert "job d2 was deleted, or its partial submit expired, during its submit" in one_line(run["error"])
    assert job_keys(r, "d2") == [] and r.zscore(JOBS_INDEX, "d2") is None  # no orphan, no key left

    again = client.submit(records(2500), profile=PROFILE, job_id="d2", chunk_size=16)
    assert again.status().status == JobStatus.QUEUED and not again.resumed
    assert len(message_refs(r, "d2")) == again.enqueued == 157  # 2,500 / 16


def test_a_lapsed_partial_job_refuses_its_submit_and_leaves_no_key_without_ttl(
    server: RedisServer, client: Client
) -> None:
    """The job's hash lapses (GENQ_SUBMIT_TTL) while the submit waits on a slow source: the
    submit stops in one line, nothing it wrote lives forever, and the same submit then makes a
    whole job (nothing of the lapsed one is counted: no claim left over makes it publish 0)."""
    r = server.client()
    gate = Gate(records(2500), at=1500)
    run = submit_in_thread(client, gate, job_id="t2", chunk_size=16)
    assert gate.reached.wait(60)
    r.setbit(job_key("t2", "claims"), 3, 1)
    r.expire(job_key("t2", "claims"), 3600)  # a leftover of the lapsed job (claims outlived it)
    r.delete(job_key("t2"))  # the hash's TTL lapses first
    gate.go.set()
    run["thread"].join(60)
    assert isinstance(run.get("error"), JobNotFound), run
    one_line(run["error"])
    left = job_keys(r, "t2")
    assert left and all(r.ttl(k) > 0 for k in left), {k: r.ttl(k) for k in left}

    again = client.submit(records(2500), profile=PROFILE, job_id="t2", chunk_size=16)
    assert again.status().status == JobStatus.QUEUED
    assert len(message_refs(r, "t2")) == again.enqueued == 157
    assert again.status().counts.total == 2500


# --- (3) retry of a cancelled or expired job ------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "expire"])
def test_retry_of_an_ended_job_is_refused_in_one_line(server: RedisServer, tmp_path: Path, how: str) -> None:
    r = server.client()
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(row) + "\n" for row in records(4)))
    extra = ["--expires-in", "1"] if how == "expire" else []
    job = genq(server.url, "submit", str(src), "--profile", PROFILE, *extra).stdout.strip()
    store = RedisStore(server.url)
    lost = error_result(store.items(job, [0])[0], ErrorInfo(type="worker_lost", message="died"))
    store.record(job, [lost])  # an error retry would otherwise run again
    if how == "cancel":
        genq(server.url, "cancel", job)
    else:
        time.sleep(1.2)
        genq(server.url, "status", job)  # a status read past the deadline ends it
    word, was = ("cancelled", "was cancelled") if how == "cancel" else ("expired", "expired")
    before = store.state(job)
    assert before.status == word and before.counts.errored == 1

    proc = genq(server.url, "retry", job, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"job {job} {was}: its items are not errors" in lines[0], lines
    assert "--new" in lines[0] and f"genq delete {job}" in lines[0]
    after = store.state(job)
    assert after.status == word and after.counts == before.counts
    assert r.hexists(job_key(job, "results"), "0") and message_refs(r, job) == []


# --- (4) a job id reused after delete runs with the new spec on a long-lived worker ----------------


@pytest.fixture(scope="module")
def engine(loaded_fp32: Any) -> Any:
    from worker.engine import Engine

    return Engine(loaded_fp32, worker="long-lived")


def run_ref(store: RedisStore, engine: Any, ref: ChunkRef, **kw: Any) -> Outcome:
    return process_chunk(
        store, engine, ref, worker="long-lived", max_attempts=3, publish=lambda *_: 0, control=store, **kw
    )


def results_of(store: RedisStore, job_id: str) -> list[ItemResult]:
    raw = store.r.hgetall(job_key(job_id, "results"))
    return [ItemResult.model_validate_json(v) for v in raw.values()]


def test_a_job_id_reused_after_delete_runs_its_new_spec_and_deadline_on_a_long_lived_worker(
    server: RedisServer, client: Client, engine: Any
) -> None:
    r = server.client()
    worker_store = RedisStore(server.url)  # one store for the worker's whole life: it caches specs
    two, twelve = GenParams(max_new_tokens=2), GenParams(max_new_tokens=12)
    first = client.submit(records(4), profile=PROFILE, job_id="X", chunk_size=4, params=two, expires_in=3)
    submitted = time.time()
    [old] = message_refs(r, "X")
    assert run_ref(worker_store, engine, old).outcome == ChunkOutcome.DONE
    assert {res.usage.completion_tokens for res in results_of(worker_store, "X")} == {2}
    assert first.status().status == JobStatus.COMPLETED

    client.delete("X")
    time.sleep(max(0.0, submitted + 3.2 - time.time()))  # past the first job's deadline
    second = client.submit(records(4), profile=PROFILE, job_id="X", chunk_size=4, params=twelve)
    [new] = message_refs(r, "X")
    assert new.inc and new.inc != old.inc

    # the first job's message delivered again (a redelivery): dropped, nothing counted
    assert run_ref(worker_store, engine, old).outcome == ChunkOutcome.SKIPPED
    assert results_of(worker_store, "X") == [] and second.status().status == JobStatus.QUEUED

    assert run_ref(worker_store, engine, new).outcome == ChunkOutcome.DONE
    state = second.status()
    assert state.status == JobStatus.COMPLETED and state.counts.succeeded == 4  # not expired
    got = results_of(worker_store, "X")
    assert len(got) == 4 and max(res.usage.completion_tokens for res in got) > 2
    assert all(res.usage.completion_tokens == 12 or res.finish_reason == "stop" for res in got)


# --- (6, 7) resubmits with other options ------------------------------------------------------------


def test_resuming_a_partial_job_with_another_priority_is_refused(server: RedisServer, client: Client) -> None:
    r = server.client()
    with pytest.raises(KeyboardInterrupt):
        client.submit(Gate(records(2500), at=1500, interrupt=True), profile=PROFILE, job_id="p6")
    assert client.job("p6").status().partial
    with pytest.raises(JobRefused) as refused:
        client.submit(records(2500), profile=PROFILE, job_id="p6", priority="high")
    text = one_line(refused.value)
    assert "job p6 was submitted with --priority normal" in text
    assert "--new" in text and "genq delete p6" in text
    assert r.llen(f"{QUEUE}.high") == 0 and r.lrange(ring_key(f"{QUEUE}.high"), 0, -1) == []

    done = client.submit(records(2500), profile=PROFILE, job_id="p6")  # the same options resume it
    assert done.resumed and done.status().status == JobStatus.QUEUED
    assert len(message_refs(r, "p6")) == 157 and r.llen(f"{QUEUE}.high") == 0


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"chunk_size": 8}, "--chunk-size 4"),
        ({"mode": "fp32"}, "--mode any"),
        ({"skip_invalid": True}, "no --skip-invalid"),
    ],
)
def test_a_job_id_resubmitted_with_other_options_is_refused_naming_the_option(
    server: RedisServer, client: Client, change: dict[str, Any], named: str
) -> None:
    r = server.client()
    client.submit(records(20), profile=PROFILE, job_id="o7", chunk_size=4)
    before = len(message_refs(r, "o7"))
    options: dict[str, Any] = {"chunk_size": 4, **change}
    with pytest.raises(JobRefused) as refused:
        client.submit(records(20), profile=PROFILE, job_id="o7", **options)
    text = one_line(refused.value)
    assert f"job o7 was submitted with {named}:" in text and "--new" in text and "genq delete o7" in text
    assert len(message_refs(r, "o7")) == before == 5
    assert r.llen("genq.tiny-random.fp32") == 0 and r.lrange(ring_key("genq.tiny-random.fp32"), 0, -1) == []


# --- (8) a resumed partial submit; delete while a chunk runs ---------------------------------------


def test_a_resumed_partial_submit_does_not_republish_chunks_already_done(
    server: RedisServer, client: Client
) -> None:
    """The first submit dies after publishing 1,000 of its 2,500 one-item chunks; workers finish
    those (their messages are gone); the resumed submit publishes the 1,500 others only."""
    r = server.client()
    from producer.options import SubmitOptions
    from worker.core.profiles import load_profile

    calls: list[int] = []

    def publish(spec: Any, chunks: dict[str, list[int]]) -> int:
        calls.append(len(chunks))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return client.publish(spec, chunks)

    options = SubmitOptions(profile=load_profile(PROFILE), chunk_size=1)
    with pytest.raises(KeyboardInterrupt):
        Submitter(client.store, publish, client.live_messages, options).submit(records(2500), "r8")
    refs = message_refs(r, "r8")
    assert len(refs) == 1000
    store = RedisStore(server.url)
    items = store.items("r8", range(1000))
    done = [
        ItemResult(index=it.index, id=it.id, line=it.line, status="ok", text="x", usage=Usage())
        for it in items
    ]
    store.record("r8", done, inc=refs[0].inc)  # the workers ran those chunks ...
    r.delete(backlog_key("r8"), QUEUE)  # ... and their messages are acknowledged

    again = client.submit(records(2500), profile=PROFILE, job_id="r8", chunk_size=1)
    assert again.resumed and again.enqueued == 1500
    assert sorted(ref.indices[0] for ref in message_refs(r, "r8")) == list(range(1000, 2500))


@pytest.mark.parametrize("then", ["runs on", "shuts down"])
def test_delete_while_a_chunk_runs_ends_the_chunk_quietly_and_leaves_no_key(
    server: RedisServer, client: Client, engine: Any, then: str
) -> None:
    """The job is deleted while its chunk runs: the chunk ends quietly (SKIPPED, no exception: no
    task failure), or, when the worker shuts down just then, is handed back; either way no key of
    the job is left (neither a result nor the hand-back's attempt count, which would have no TTL)."""
    r = server.client()
    client.submit(records(8), profile=PROFILE, job_id="g8", chunk_size=8)
    [ref] = message_refs(r, "g8")
    deleted: list[bool] = []

    def delete_once() -> bool:
        if not deleted:
            deleted.append(True)
            Client(server.url).delete("g8")
        return then == "shuts down"

    if then == "runs on":
        outcome = run_ref(RedisStore(server.url), engine, ref, should_stop=delete_once)
        assert outcome.outcome == ChunkOutcome.SKIPPED
    else:
        with pytest.raises(ShutdownRequested):
            run_ref(RedisStore(server.url), engine, ref, should_stop=delete_once)
    assert deleted and job_keys(r, "g8") == [] and r.zscore(JOBS_INDEX, "g8") is None


def test_delete_while_a_real_worker_runs_a_chunk_logs_no_task_failure(
    server: RedisServer, tmp_path: Path
) -> None:
    """`genq delete` while a worker process generates a chunk: the worker drops the chunk as a
    chunk of a missing job (an event), Celery logs no failure and no traceback, and nothing of
    the job is left in Redis (no result written after the delete)."""
    from tests.cluster import log_events
    from tests.helpers import WorkerProcess, wait_for, write_prompts

    r = server.client()
    slow = {"GENQ_VISIBILITY_TIMEOUT": "30", "GENQ_FAULT_SLOW_MS": "2000"}
    worker = WorkerProcess(server.url, tmp_path / "w.log", name="busy", env=slow).start()
    try:
        src = write_prompts(tmp_path / "in.jsonl", 64, max_new_tokens=4)
        job = genq(server.url, "submit", str(src), "--profile", PROFILE, "--chunk-size", "64").stdout.strip()
        wait_for(lambda: r.hlen(job_key(job, "running")) > 0, timeout=120, what="the chunk to start")
        assert "deleted" in genq(server.url, "delete", job).stderr
        wait_for(
            lambda: log_events(worker.log_path, "chunk_of_missing_job", job=job),
            timeout=120,
            what="the worker to drop the chunk",
        )
        time.sleep(1.0)  # the task's own end (Celery's succeeded line) follows the event
    finally:
        worker.stop()
    text = worker.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "raised unexpected" not in text, text[-3000:]
    assert job_keys(r, job) == [] and r.zscore(JOBS_INDEX, job) is None


# --- the fleet's and the follower's steps -------------------------------------------------------------


def ok_results(store: RedisStore, job_id: str, n: int) -> list[ItemResult]:
    """The same results for both incarnations of a job id (so their stored json is the same)."""
    return [
        ItemResult(index=it.index, id=it.id, line=it.line, status="ok", text="x", usage=Usage())
        for it in store.items(job_id, range(n))
    ]


def test_a_follower_of_a_deleted_job_drains_nothing_of_its_new_incarnation(
    server: RedisServer, client: Client
) -> None:
    """A `collect --follow` reads a page of job dr, and dr is deleted and submitted again (its
    results the same bytes) before the page is confirmed: the drain is refused in the same step
    (the follower's incarnation is not the job's), and the new job's results stay in Redis."""
    from producer.follow import Follower
    from worker.store.drain import result_digest

    r = server.client()
    store = RedisStore(server.url)
    client.submit(records(4), profile=PROFILE, job_id="dr", chunk_size=4)
    store.record("dr", ok_results(store, "dr", 4))
    with Follower(client.job("dr")) as follower:
        old = r.hgetall(job_key("dr", "results"))
        rows = [(int(i), result_digest(raw), False) for i, raw in old.items()]
        client.delete("dr")
        client.submit(records(4), profile=PROFILE, job_id="dr", chunk_size=4)
        assert follower.inc and store.spec("dr").incarnation != follower.inc
        store.record("dr", ok_results(store, "dr", 4))
        assert r.hgetall(job_key("dr", "results")) == old  # the same bytes: the digests match
        with pytest.raises(JobNotFound) as gone:
            follower.confirm(rows)
        assert "nothing is drained" in one_line(gone.value)
    assert r.hlen(job_key("dr", "results")) == 4 and r.hlen(job_key("dr", "inputs")) == 1  # one block
    assert store.drained_total("dr") == 0
    # the new incarnation's own follower drains them
    assert store.confirm_drained("dr", rows, inc=store.spec("dr").incarnation) == 4
    assert r.hlen(job_key("dr", "results")) == 0 and store.drained_total("dr") == 4

    client.delete("dr")  # a job gone: refused, and no key of it is made again
    with pytest.raises(JobNotFound):
        store.confirm_drained("dr", rows)
    assert job_keys(r, "dr") == []


def test_waste_of_another_incarnation_or_a_gone_job_counts_nothing(
    server: RedisServer, client: Client
) -> None:
    r = server.client()
    store = RedisStore(server.url)
    client.submit(records(4), profile=PROFILE, job_id="w1", chunk_size=4)
    old = store.spec("w1").incarnation
    assert store.add_waste("w1", 7, 1, inc=old) == 7
    client.delete("w1")
    assert store.add_waste("w1", 5, 1, inc=old) == 0 and job_keys(r, "w1") == []  # nothing recreated
    client.submit(records(4), profile=PROFILE, job_id="w1", chunk_size=4)
    assert store.add_waste("w1", 5, 1, inc=old) == 0  # an old chunk's waste: not the new job's
    assert store.waste("w1") == (0, 0)
    assert store.add_waste("w1", 3, 2, inc=store.spec("w1").incarnation) == 3
    assert store.waste("w1") == (3, 2)


@pytest.mark.parametrize(
    ("event", "said"), [(Event.BACKUP, "no backup is taken"), (Event.TIME_BOX, "not handed on")]
)
def test_a_backup_or_a_time_box_of_a_cancelled_job_records_no_chunk(
    server: RedisServer, client: Client, event: Event, said: str
) -> None:
    r = server.client()
    store = RedisStore(server.url)
    client.submit(records(4), profile=PROFILE, job_id="b1", chunk_size=4)
    inc = store.spec("b1").incarnation
    client.job("b1").cancel()
    with pytest.raises(JobRefused) as refused:
        store.add_chunks("b1", {"c000000.b": [1, 2]}, inc=inc, event=event)
    assert "job b1 is cancelled" in one_line(refused.value) and said in str(refused.value)
    assert not r.hexists(job_key("b1", "chunks"), "c000000.b")


# --- a job's messages leave the queues in the step that ends it ---------------------------------------

FP32, NF4 = f"genq.{PROFILE}.fp32", f"genq.{PROFILE}.nf4"


def test_the_step_that_completes_a_job_takes_its_waiting_messages_off_the_queues(
    server: RedisServer, client: Client
) -> None:
    """A job completed by chunks that ran its items (a redelivery, a backup) while other messages
    of it still wait: the record that completes it withdraws them in the same step (a retry may
    reopen the job right after it, and its round's messages must then stay)."""
    r = server.client()
    store = RedisStore(server.url)
    store.register_consumer("w-fp32", [FP32], ttl=60)  # an fp32 worker: any jobs' chunks reach its queue
    client.submit(records(4), profile=PROFILE, job_id="m1", chunk_size=1)
    assert len(message_refs(r, "m1", FP32)) == 4 and r.llen(FP32) == 2  # 2 queued, 2 in the backlog
    assert store.ring(QUEUE) == ["m1"]
    inc = store.spec("m1").incarnation
    lost = ErrorInfo(type="worker_lost", message="lost")
    done = [error_result(store.items("m1", [0])[0], lost), *ok_results(store, "m1", 4)[1:]]
    store.record("m1", done, "w-fp32", inc=inc)
    assert client.job("m1").status().status == "completed"
    assert message_refs(r, "m1", FP32) == [] and r.llen(FP32) == 0 and not r.exists(backlog_key("m1"))
    assert store.ring(QUEUE) == []
    # a retry reopens it: its round's message waits, and the next completion withdraws it
    assert client.job("m1").retry() == 1
    assert [ref.indices for ref in message_refs(r, "m1", FP32)] == [[0]]
    store.record("m1", ok_results(store, "m1", 1), "w-fp32", inc=inc)
    assert client.job("m1").status().status == "completed" and message_refs(r, "m1", FP32) == []


def test_a_ring_entry_of_a_lapsed_incarnation_never_serves_its_id_submitted_again(
    server: RedisServer, client: Client
) -> None:
    """Job m2 pinned to fp32 waits in the fp32 ring; its keys lapse (a partial job's TTL) and the id
    is submitted again pinned to nf4.  The fp32 ring's entry names the old incarnation: an fp32
    dispatch drops it and moves nothing of the new job, and a publish of the old incarnation
    (its submit still running) puts no entry back."""
    r = server.client()
    store = RedisStore(server.url)
    client.submit(records(5), profile=PROFILE, job_id="m2", chunk_size=1, mode="fp32")
    old = store.spec("m2").incarnation
    assert store.ring_entries(FP32) == [("m2", old)] and r.llen(FP32) == 2
    r.delete(*all_job_keys("m2"))  # the lapse: every key of the job goes
    client.submit(records(3), profile=PROFILE, job_id="m2", chunk_size=1, mode="nf4")
    new = store.spec("m2").incarnation
    assert store.ring_entries(NF4) == [("m2", new)] and r.llen(NF4) == 2  # and 1 in the backlog
    with pytest.raises(JobNotFound):  # the old submit publishing on: refused, no entry added
        store.enqueue("m2", FP32, [[r.lindex(FP32, 0)]], inc=old)
    assert store.ring_entries(FP32) == [("m2", old)]
    r.delete(FP32)  # the fp32 worker takes the old incarnation's two messages (and drops them)
    store.dispatch([FP32])
    assert r.llen(FP32) == 0 and store.ring_entries(FP32) == []  # nothing of the nf4 job on fp32
    assert store.backlog_length("m2") == 1 and r.llen(NF4) == 2


def test_the_step_that_deletes_a_job_takes_it_off_the_queues_and_a_new_submit_keeps_its_own(
    server: RedisServer, client: Client
) -> None:
    """Delete is one step (delete.lua): the job's keys, its ring entry, its backlog and its messages
    waiting on the broker queues go together, so a submit of the id that lands right after it
    (before any later cleanup could run) never loses its own backlog or messages to the delete."""
    r = server.client()
    store = RedisStore(server.url)
    client.submit(records(5), profile=PROFILE, job_id="d1", chunk_size=1, mode="fp32")
    assert len(message_refs(r, "d1", FP32)) == 5 and r.llen(FP32) == 2  # 2 queued, 3 in the backlog
    keys, waiting = store.delete("d1")  # the store's step alone: nothing done after it
    assert keys > 0 and waiting == 5
    assert message_refs(r, "d1", FP32) == [] and store.ring_entries(FP32) == [] and job_keys(r, "d1") == []
    client.submit(records(3), profile=PROFILE, job_id="d1", chunk_size=1, mode="fp32")
    new = store.spec("d1").incarnation
    assert len(message_refs(r, "d1", FP32)) == 3 and r.llen(FP32) == 2
    assert store.ring_entries(FP32) == [("d1", new)]
