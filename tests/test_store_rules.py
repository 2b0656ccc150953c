"""The store's rules, in process: :func:`process_chunk` against a real :class:`RedisStore` (its own
``redis-server``, its Lua scripts) and the real engine on the tiny model, with no worker process
and no Celery.  Each test drives one rule to its edge and reads Redis back:

* first write wins, and counts, tokens and per-worker figures move once per item, also when a
  second live writer of the same chunk gets there first in the middle of a chunk;
* every delivery is an attempt; past the cap the chunk is split (once, even when two workers
  split it), and a lone item past the cap is recorded ``worker_lost``;
* a hand-back (shutdown) keeps what was written and does not count the delivery;
* a cancel ends as a count once no live worker runs a chunk; expiry likewise;
* a retry (unrecord) reopens the job and keeps its first finish time;
* chunk claims are won once; keys created while a job is ``submitting`` carry its TTL, and
  finishing the submit lifts it from all of them.

Two "workers" here are two engines with different names over one loaded model: a result's
``worker`` field is the engine's, as in a worker process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import RedisServer, make_job
from worker.chunks import Outcome, process_chunk
from worker.core.errors import ShutdownRequested
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, Item, ItemResult, JobSpec, error_result
from worker.core.settings import Settings
from worker.core.states import ChunkOutcome, ErrorCode
from worker.engine import Engine
from worker.store import RedisStore
from worker.store.drain import result_digest
from worker.store.keys import job_key, job_keys

PROFILE = "tiny-random"
PROMPTS = ["the patient", "fever 1 fever", "a dose of aspirin", "blood pressure", "chest pain and cough"]


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    settings = Settings.from_env({"GENQ_VISIBILITY_TIMEOUT": "30"})
    yield RedisStore(redis_server.url, settings=settings)


@pytest.fixture(scope="module")
def engines(loaded_fp32: Any) -> dict[str, Engine]:
    """Two workers' engines: one row at a time, so a micro-batch is 4 items and each item is
    written on its own as it finishes."""
    return {name: Engine(loaded_fp32, max_batch_size=1, worker=name) for name in ("a", "b")}


def items(n: int) -> list[Item]:
    return [
        Item(
            index=i,
            id=f"p{i:02d}",
            line=i + 1,
            prompt=f"{PROMPTS[i % len(PROMPTS)]} {i}",
            params=GenParams(max_new_tokens=4),
        )
        for i in range(n)
    ]


def new_job(store: RedisStore, n: int, job: str = "j1", chunk_size: int = 4, **kw: Any) -> list[Item]:
    spec = JobSpec(job_id=job, profile=PROFILE, chunk_size=chunk_size, total=n, **kw)
    made = items(n)
    make_job(store, spec, made)
    return made


def run(
    store: RedisStore,
    engine: Engine,
    cid: str,
    indices: list[int],
    *,
    job: str = "j1",
    max_attempts: int = 3,
    published: list[dict[str, list[int]]] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    sink = published if published is not None else []
    return process_chunk(
        store,
        engine,
        ChunkRef(job_id=job, chunk_id=cid, indices=indices),
        worker=str(engine.worker),
        max_attempts=max_attempts,
        publish=lambda _spec, chunks: sink.append(chunks),
        control=store,
        should_stop=should_stop,
    )


def stored(store: RedisStore, job: str = "j1") -> dict[int, ItemResult]:
    raw = store.r.hgetall(job_key(job, "results"))
    return {int(i): ItemResult.model_validate_json(v) for i, v in raw.items()}


def job_hash(store: RedisStore, job: str = "j1") -> dict[str, str]:
    return {str(k): str(v) for k, v in store.r.hgetall(job_key(job)).items()}


def writes(logs: list[dict[str, Any]]) -> list[tuple[str, list[int], list[int]]]:
    return [
        (e["worker"], e["written_indices"], e["dropped_indices"])
        for e in logs
        if e["event"] == "results_written"
    ]


# --- first write wins --------------------------------------------------------------------------


def test_a_second_live_writer_first_wins_and_counts_move_once(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """Worker a runs a chunk of 8 (micro-batches of 4) while worker b, holding the same chunk,
    writes the 4 items a has not written yet right after a's first micro-batch: a generates them
    too and its writes of them are dropped (logged as dropped), their stored results are b's,
    and every counter moved once per item: succeeded, prompt and completion tokens equal the
    stored results' sums, per-worker items are 4 + 4."""
    made = new_job(store, 8, chunk_size=8)
    b_results = engines["b"].generate(made)
    injected: list[int] = []

    def b_writes_mid_chunk() -> bool:
        done = stored(store)
        if not injected and len(done) >= 4:
            injected.extend(store.record_indices("j1", [r for r in b_results if r.index not in done], "b"))
        return False

    with capture_logs() as logs:
        outcome = run(store, engines["a"], "c000000", list(range(8)), should_stop=b_writes_mid_chunk)
    assert len(injected) == 4
    assert outcome.outcome == ChunkOutcome.DONE and outcome.written == 4
    a_writes = writes(logs)
    a_wrote = sorted(i for _, w, _ in a_writes for i in w)
    assert sorted(a_wrote + injected) == list(range(8))
    assert sorted(i for _, _, d in a_writes for i in d) == sorted(injected)
    results = stored(store)
    assert {i: r.worker for i, r in results.items()} == {i: "b" if i in injected else "a" for i in range(8)}
    # b, late again with everything: nothing moves
    assert store.record_indices("j1", b_results, "b") == []
    assert stored(store) == results
    h = job_hash(store)
    assert (h["status"], h["succeeded"], h["errored"]) == ("completed", "8", "0")
    assert int(h["completion_tokens"]) == sum(r.usage.completion_tokens for r in results.values())
    assert int(h["prompt_tokens"]) == sum(r.usage.prompt_tokens for r in results.values())
    per_worker = store.r.hgetall(job_key("j1", "workers"))
    assert (per_worker["a:items"], per_worker["b:items"]) == ("4", "4")
    assert int(per_worker["a:tokens"]) == sum(results[i].usage.completion_tokens for i in a_wrote)


def test_a_redelivered_chunk_generates_only_what_is_missing(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """A chunk whose first two items are already written: the next delivery generates and writes
    only the other two; a delivery after that finds nothing to do and is not counted."""
    made = new_job(store, 4)
    store.record_indices("j1", engines["b"].generate(made[:2]), "b")
    with capture_logs() as logs:
        assert run(store, engines["a"], "c000000", [0, 1, 2, 3]).written == 2
        assert run(store, engines["a"], "c000000", [0, 1, 2, 3]).outcome == ChunkOutcome.SKIPPED
    assert sorted(i for worker, written, dropped in writes(logs) for i in written + dropped) == [2, 3]
    assert {worker for worker, _, dropped in writes(logs) if not dropped} == {"a"}
    assert store.attempts("j1") == {"c000000": 1}


# --- attempts, the cap and the split ------------------------------------------------------------


def test_past_the_cap_the_chunk_is_split_once_then_a_lone_item_is_worker_lost(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """GENQ_MAX_ATTEMPTS=2: two deliveries of a chunk died (counted, nothing written); the third
    splits it into halves, published once even when a second live worker splits it too; a half
    whose one pending item was delivered past the cap records that item as ``worker_lost``."""
    new_job(store, 4)
    for _ in range(2):
        store.start_attempt("j1", "c000000", "dead")
    published: list[dict[str, list[int]]] = []
    first = run(store, engines["a"], "c000000", [0, 1, 2, 3], max_attempts=2, published=published)
    second = run(store, engines["b"], "c000000", [0, 1, 2, 3], max_attempts=2, published=published)
    children = {"c000000.0": [0, 1], "c000000.1": [2, 3]}
    assert (first.outcome, first.children) == (ChunkOutcome.SPLIT, children)
    assert (second.outcome, second.children) == (ChunkOutcome.SPLIT, {})
    assert published == [children]
    assert dict(store.stored_chunks("j1")) == {**children, "c000000": []}
    assert store.attempts("j1") == {"c000000": 4}

    run(store, engines["a"], "c000000.0", [0, 1], max_attempts=2)
    store.record_indices("j1", engines["b"].generate(items(4)[2:3]), "b")  # item 2 done elsewhere
    for _ in range(2):
        store.start_attempt("j1", "c000000.1", "dead")
    lost = run(store, engines["a"], "c000000.1", [2, 3], max_attempts=2)
    assert lost.outcome == ChunkOutcome.WORKER_LOST and lost.written == 1
    bad = stored(store)[3]
    assert bad.error is not None and bad.error.type == ErrorCode.WORKER_LOST
    assert bad.attempts == 2 and "died 2 times" in bad.error.message
    h = job_hash(store)
    assert (h["status"], h["succeeded"], h["errored"]) == ("completed", "3", "1")


def test_within_the_cap_a_chunk_runs(store: RedisStore, engines: dict[str, Engine]) -> None:
    """The cap is a number of deliveries: the delivery numbered GENQ_MAX_ATTEMPTS still runs."""
    new_job(store, 2)
    store.start_attempt("j1", "c000000", "dead")
    outcome = run(store, engines["a"], "c000000", [0, 1], max_attempts=2)
    assert (outcome.outcome, outcome.written) == (ChunkOutcome.DONE, 2)
    assert {r.attempts for r in stored(store).values()} == {2}


# --- hand-back ------------------------------------------------------------------------------------


def test_a_handed_back_chunk_keeps_its_results_and_is_not_an_attempt(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """A shutdown after the first results of a chunk of 8: ShutdownRequested reaches the caller,
    what was written stays, the delivery is not counted and the chunk is no longer running; the
    next delivery generates only the rest and is attempt 1."""
    new_job(store, 8, chunk_size=8)
    with pytest.raises(ShutdownRequested):
        run(store, engines["a"], "c000000", list(range(8)), should_stop=lambda: len(stored(store)) >= 1)
    kept = stored(store)
    assert 1 <= len(kept) < 8
    assert store.attempts("j1") == {"c000000": 0}
    assert store.running("j1") == {}
    assert job_hash(store)["succeeded"] == str(len(kept))
    outcome = run(store, engines["b"], "c000000", list(range(8)))
    assert outcome.written == 8 - len(kept)
    assert store.attempts("j1") == {"c000000": 1}
    assert all(stored(store)[i] == r for i, r in kept.items())
    assert job_hash(store)["status"] == "completed"


# --- the end of a job: cancel and expiry as counts --------------------------------------------------


def test_cancel_settles_as_a_count_once_no_live_worker_runs(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """12 items in chunks of 4: one chunk done, one held by a live worker, when the job is
    cancelled.  It stays ``cancelling`` while that worker runs (a third chunk delivered meanwhile
    generates nothing); when it stops, the job ends ``cancelled`` with 8 cancelled as a number:
    no row per cancelled item, and a late write changes nothing."""
    made = new_job(store, 12)
    run(store, engines["a"], "c000000", [0, 1, 2, 3])
    store.start_attempt("j1", "c000001", "x")  # a live worker holds chunk 1
    assert store.request_cancel("j1").status == "cancelling"
    with capture_logs() as logs:
        assert run(store, engines["b"], "c000002", [8, 9, 10, 11]).outcome == ChunkOutcome.CANCELLED
    assert writes(logs) == []
    assert job_hash(store)["status"] == "cancelling"
    store.clear_running("j1", "c000001")
    assert store.settle("j1") is True
    h = job_hash(store)
    assert (h["status"], h["succeeded"], h["cancelled"], h["errored"]) == ("cancelled", "4", "8", "0")
    assert store.r.hlen(job_key("j1", "results")) == 4
    assert store.record_indices("j1", engines["a"].generate(made[4:8]), "x") == []
    assert store.r.hlen(job_key("j1", "results")) == 4
    assert store.state("j1").counts.pending == 0
    assert all(store.r.ttl(k) > 0 for k in job_keys("j1") if store.r.exists(k))


def test_an_expired_job_ends_as_a_count_without_generating(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    new_job(store, 8, expires_at=time.time() - 1)
    with capture_logs() as logs:
        assert run(store, engines["a"], "c000000", [0, 1, 2, 3]).outcome == ChunkOutcome.EXPIRED
    assert writes(logs) == []
    h = job_hash(store)
    assert (h["status"], h["expired"], h["succeeded"]) == ("expired", "8", "0")
    assert store.r.hlen(job_key("j1", "results")) == 0
    assert store.attempts("j1") == {}


# --- retry -------------------------------------------------------------------------------------------


def test_retry_reopens_the_job_and_keeps_its_first_finish_time(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    made = new_job(store, 4)
    failed = error_result(made[1], ErrorInfo(type=ErrorCode.GENERATION_ERROR, message="boom"), worker="b")
    store.record_indices("j1", [failed], "b")
    run(store, engines["a"], "c000000", [0, 1, 2, 3])
    h = job_hash(store)
    assert (h["status"], h["errored"]) == ("completed", "1")
    first = h["first_finished_at"]
    assert h["finished_at"] == first

    assert store.forget("j1", list(store.retryable("j1"))) == 1
    h = job_hash(store)
    assert (h["status"], h["errored"], h["first_finished_at"]) == ("in_progress", "0", first)
    assert "finished_at" not in h and all(store.r.ttl(k) == -1 for k in job_keys("j1") if store.r.exists(k))
    time.sleep(0.01)
    store.add_chunks("j1", {"r1000000": [1]})
    assert run(store, engines["b"], "r1000000", [1]).written == 1
    h = job_hash(store)
    assert (h["status"], h["succeeded"], h["errored"]) == ("completed", "4", "0")
    assert h["first_finished_at"] == first and float(h["finished_at"]) > float(first)


# --- claims and the partial job's TTL ----------------------------------------------------------------


def test_claims_are_won_once_and_keys_of_a_partial_job_inherit_its_ttl(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """While a job is ``submitting`` (its hash has the submit TTL) every key created for it gets
    that TTL too: inputs, claims, attempts, running, chunk records, results, per-worker figures,
    the backlog of undispatched messages, the bitmap of items drained to a `collect --follow`.
    A chunk is claimed once.  Finishing the submit lifts the TTL from every key."""
    spec = JobSpec(job_id="j1", profile=PROFILE, chunk_size=2, total=4)
    made = items(4)
    store.begin(spec.model_copy(update={"total": 0}))
    store.write_inputs("j1", [(it.index, it.model_dump_json()) for it in made])
    store.complete_inputs(spec)
    assert store.claim("j1", [0, 1]) == [0, 1]
    assert store.claim("j1", [1, 0]) == []
    store.add_chunks("j1", {"r1000000": [3]})
    run(store, engines["a"], "c000000", [0, 1])  # a worker faster than the submit
    h = job_hash(store)
    assert (h["status"], h["succeeded"]) == ("submitting", "2")
    store.start_attempt("j1", "c000001", "x")  # running and attempts exist now too
    # three messages published: two go to the broker queue (its depth), one waits in the backlog
    store.enqueue("j1", "genq.q", [["m1", "m2", "m3"]])
    assert store.r.lrange("genq.q", 0, -1) == ["m2", "m1"] and store.backlog_length("j1") == 1
    # a `collect --follow` drains item 0 and an error of item 2 (its drained keys exist now too)
    store.record("j1", [error_result(made[2], ErrorInfo(type=ErrorCode.GENERATION_ERROR, message="x"))])
    raw = store.r.hmget(job_key("j1", "results"), ["0", "2"])
    drained = [(0, result_digest(raw[0] or ""), False), (2, result_digest(raw[1] or ""), True)]
    assert store.confirm_drained("j1", drained) == 2
    ttl = store.r.pttl(job_key("j1"))
    assert 0 < ttl <= store.settings.submit_ttl * 1000
    for key in job_keys("j1"):
        assert store.r.exists(key), key
        # the same deadline as the job's (a key set from a reply a moment old may outlive it by ms)
        assert abs(store.r.pttl(key) - ttl) < 1000, key
    assert store.finish_submit("j1") == "in_progress"
    assert {k: store.r.pttl(k) for k in job_keys("j1")} == dict.fromkeys(job_keys("j1"), -1)
    assert json.loads(store.r.hget(job_key("j1"), "spec") or "{}")["total"] == 4
