"""Leases, backups and the time box, in process, against a real ``redis-server`` and kombu's own
restore code (no worker process): the rules the worker tests (tests/test_leases.py,
tests/test_backup.py) rely on, each driven to its edge.

* renewing a lease moves kombu's delivery time of that message and the job's running entry (only
  when the entry is this worker's), and says so when the message is no longer unacknowledged;
* the lease sweep puts back exactly the genq messages whose lease lapsed, at the head of their
  queue, marked redelivered, and leaves fresh ones and other applications' messages alone;
* a time box hands on what is left as one new chunk, after some progress only;
* a chunk whose items another worker records goes on with the rest only, and what it generated
  and could not keep is counted on the job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.helpers import RedisServer
from tests.test_store_rules import job_hash, new_job, run, stored
from worker import chunks
from worker.chunks import backup_id, process_chunk
from worker.core.schema import ChunkRef
from worker.core.settings import Settings
from worker.core.states import ChunkOutcome
from worker.engine import Engine
from worker.queue.app import make_app
from worker.queue.leases import sweep_lapsed
from worker.queue.messages import UNACKED, UNACKED_INDEX
from worker.queue.routing import TASK_NAME
from worker.store import RedisStore
from worker.store.keys import job_key


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    yield RedisStore(redis_server.url, settings=Settings.from_env({"GENQ_BROKER_URL": redis_server.url}))


@pytest.fixture(scope="module")
def engines(loaded_fp32: Any) -> dict[str, Engine]:
    """Two workers' engines, one row at a time: a micro-batch is 4 items."""
    return {name: Engine(loaded_fp32, max_batch_size=1, worker=name) for name in ("a", "b")}


def envelope(task: str, task_id: str, tag: str) -> dict[str, Any]:
    """A delivered message as kombu's Redis transport keeps it (the fields its restore reads)."""
    return {
        "body": "W10=",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": task, "id": task_id},
        "properties": {
            "delivery_tag": tag,
            "delivery_info": {"exchange": "", "routing_key": "genq.tiny-random.any"},
            "priority": 0,
            "body_encoding": "base64",
        },
    }


def deliver(store: RedisStore, task: str, task_id: str, tag: str, at: float) -> None:
    payload = json.dumps([envelope(task, task_id, tag), "", "genq.tiny-random.any"])
    store.r.hset(UNACKED, tag, payload)
    store.r.zadd(UNACKED_INDEX, {tag: at})


def test_renewing_a_lease_moves_the_delivery_time_and_this_workers_running_entry(store: RedisStore) -> None:
    new_job(store, 4)
    deliver(store, TASK_NAME, "j1:c000000", "tag-1", at=100.0)
    store.r.hset(job_key("j1", "running"), "c000000", "w1|100.0")
    store.r.hset(job_key("j1", "running"), "c000001", "w2|100.0")
    before = time.time()
    assert store.renew_lease(UNACKED_INDEX, "tag-1", "j1", "c000000", "w1")
    assert float(store.r.zscore(UNACKED_INDEX, "tag-1") or 0) >= before
    worker, _, since = store.r.hget(job_key("j1", "running"), "c000000").rpartition("|")
    assert worker == "w1" and float(since) >= before
    # another worker's entry is not touched; a message no longer unacknowledged is a lost lease
    assert store.renew_lease(UNACKED_INDEX, "tag-1", "j1", "c000001", "w1")
    assert store.r.hget(job_key("j1", "running"), "c000001") == "w2|100.0"
    store.r.zrem(UNACKED_INDEX, "tag-1")
    assert not store.renew_lease(UNACKED_INDEX, "tag-1", "j1", "c000000", "w1")
    assert store.r.zscore(UNACKED_INDEX, "tag-1") is None


def test_the_sweep_puts_back_only_genq_messages_whose_lease_lapsed(store: RedisStore) -> None:
    now = time.time()
    deliver(store, TASK_NAME, "j1:c000000", "lapsed", at=now - 100)
    deliver(store, TASK_NAME, "j1:c000001", "fresh", at=now - 5)
    deliver(store, "other.app.task", "x", "foreign", at=now - 100)
    store.r.lpush("genq.tiny-random.any", "waiting")
    app = make_app(store.settings)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert sweep_lapsed(channel, channel.client, lease=30, now=now) == ["j1:c000000"]
        assert sweep_lapsed(channel, channel.client, lease=30, now=now) == []
    assert set(store.r.hkeys(UNACKED)) == {"fresh", "foreign"}
    assert set(store.r.zrange(UNACKED_INDEX, 0, -1)) == {"fresh", "foreign"}
    queue = store.r.lrange("genq.tiny-random.any", 0, -1)
    # at the head (the right end, where kombu's BRPOP takes from), marked redelivered
    assert queue[0] == "waiting" and len(queue) == 2
    back = json.loads(queue[-1])
    assert back["headers"]["id"] == "j1:c000000"
    assert back["properties"]["delivery_info"]["redelivered"] is True


def test_the_time_box_hands_on_what_is_left_as_one_chunk(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    new_job(store, 8, chunk_size=8)
    published: list[dict[str, list[int]]] = []
    outcome = process_chunk(
        store,
        engines["a"],
        ChunkRef(job_id="j1", chunk_id="c000000", indices=list(range(8))),
        worker="a",
        max_attempts=3,
        publish=lambda _spec, chunks: published.append(chunks),
        control=store,
        time_box=1e-6,  # over at once: the first rows run (progress), then the box ends it
    )
    done = sorted(stored(store))
    left = [i for i in range(8) if i not in done]
    assert outcome.outcome == ChunkOutcome.SPLIT and outcome.written == len(done) >= 1
    assert published == [{"c000000.r": left}] and left
    assert json.loads(store.r.hget(job_key("j1", "chunks"), "c000000.r")) == left
    # the rest runs as an ordinary chunk and completes the job
    assert run(store, engines["b"], "c000000.r", left).outcome == ChunkOutcome.DONE
    assert job_hash(store)["status"] == "completed"


def test_a_chunk_taken_over_goes_on_with_the_rest_and_counts_what_it_could_not_keep(
    store: RedisStore, engines: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    # check for a backup between every two micro-batches: the tiny engine may run the whole chunk
    # within one TAKEOVER_CHECK interval, and the test is about what a check finds, not when
    monkeypatch.setattr(chunks, "TAKEOVER_CHECK", 0.0)
    new_job(store, 12, chunk_size=12)
    stolen = list(range(4, 12))
    calls = 0

    def backup_records_the_tail() -> bool:
        # after the slower worker's first micro-batch another worker backs the chunk up and
        # records its last 8 items (as a backup chunk would); the slower one must notice
        nonlocal calls
        calls += 1
        if calls == 2:
            store.add_chunks("j1", {backup_id("c000000"): stolen})
            assert run(store, engines["b"], backup_id("c000000"), stolen).outcome == ChunkOutcome.DONE
        return False

    with capture_logs() as logs:
        outcome = run(store, engines["a"], "c000000", list(range(12)), should_stop=backup_records_the_tail)
    assert outcome.outcome == ChunkOutcome.DONE
    results = stored(store)
    assert sorted(results) == list(range(12))
    assert {results[i].worker for i in stolen} == {"b"}
    shared = [e for e in logs if e["event"] == "chunk_shared"]
    assert shared, "the slower run never noticed the backup"
    dropped = sum(e["dropped_tokens"] for e in logs if e["event"] == "results_written")
    raw = job_hash(store)
    assert int(raw.get("wasted_tokens", 0)) == dropped
    assert job_hash(store)["status"] == "completed"


def test_results_a_chunk_could_not_keep_are_counted_as_wasted(
    store: RedisStore, engines: dict[str, Engine]
) -> None:
    """Another worker records 8 items of a chunk just after its run started (a second delivery:
    no backup record, so the run has no reason to look): the run generates every item, those 8
    are dropped, and their tokens are the job's ``wasted_tokens``."""
    new_job(store, 12, chunk_size=12)
    stolen = list(range(4, 12))
    calls = 0

    def another_writer_first() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            assert run(store, engines["b"], "r1", stolen).outcome == ChunkOutcome.DONE
        return False

    with capture_logs() as logs:
        outcome = run(store, engines["a"], "c000000", list(range(12)), should_stop=another_writer_first)
    assert outcome.outcome == ChunkOutcome.DONE
    writes = [e for e in logs if e["event"] == "results_written" and e["chunk"] == "c000000"]
    dropped = sum(e["dropped_tokens"] for e in writes)
    raw = job_hash(store)
    assert dropped > 0 and int(raw["wasted_tokens"]) == dropped
    assert int(raw["wasted_items"]) == sum(e["dropped"] for e in writes) == len(stolen)
