"""The fair-share dispatcher (worker/store/lua/dispatch.lua) against a real Redis: round robin
between jobs, the queue's depth, ended jobs dropped, and every message in exactly one place."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import RedisServer
from worker.core.schema import JobSpec
from worker.core.settings import Settings
from worker.store import RedisStore
from worker.store.keys import backlog_key, ring_key

QUEUE = "genq.tiny-random.any"


def store_for(server: RedisServer, depth: int = 1) -> RedisStore:
    return RedisStore(
        settings=Settings.from_env({"GENQ_BROKER_URL": server.url, "GENQ_QUEUE_DEPTH": str(depth)})
    )


def message(job: str, n: int) -> str:
    """An envelope as kombu stores it, as far as the dispatcher and message_ids care."""
    return json.dumps({"body": "", "headers": {"id": f"{job}:c{n:06d}"}, "properties": {}})


def add_job(store: RedisStore, job: str, n: int, status: str = "in_progress") -> None:
    spec = JobSpec(job_id=job, profile="tiny-random", chunk_size=1, total=n)
    store.r.hset(f"genq:job:{job}", mapping={"status": status, "spec": spec.model_dump_json(), "total": n})
    store.enqueue(job, QUEUE, [[message(job, i) for i in range(n)]])


def task_id(raw: str) -> str:
    return str(json.loads(raw)["headers"]["id"])


def consume_all(store: RedisStore, depth: int) -> list[str]:
    """Play a worker: take the oldest message, dispatch, until nothing is left."""
    taken: list[str] = []
    while (raw := store.r.rpop(QUEUE)) is not None:
        taken.append(task_id(raw))
        store.dispatch([QUEUE])
        assert store.r.llen(QUEUE) <= depth
    return taken


def test_round_robin_between_three_jobs_at_the_depth(redis_server: RedisServer) -> None:
    store = store_for(redis_server, depth=1)
    for job in ("a", "b", "c"):
        add_job(store, job, 4)
    assert store.r.llen(QUEUE) == 1  # the depth: the rest waits in the backlogs
    assert sorted(store.ring(QUEUE)) == ["a", "b", "c"]
    taken = consume_all(store, depth=1)
    jobs = [t.split(":")[0] for t in taken]
    assert jobs[0] == "a"  # dispatched when it was alone
    # after that, strictly in turn: every three consecutive chunks are one of each job
    assert all(len(set(jobs[i : i + 3])) == 3 for i in range(1, len(jobs) - 3)), jobs
    assert Counter(taken) == Counter(f"{j}:c{n:06d}" for j in "abc" for n in range(4))
    # each job's chunks in order
    for job in "abc":
        assert [t for t in taken if t.startswith(job)] == [f"{job}:c{n:06d}" for n in range(4)]
    assert store.ring(QUEUE) == [] and not store.r.exists(backlog_key("a"))


def test_depth_follows_the_live_consumers(redis_server: RedisServer) -> None:
    store = store_for(redis_server, depth=2)
    store.register_consumer("w1", [QUEUE], ttl=30)
    store.register_consumer("w2", [QUEUE], ttl=30)
    store.register_consumer("gone", [QUEUE], ttl=-1)  # its heartbeat has expired: not counted
    add_job(store, "big", 100)
    assert store.r.llen(QUEUE) == 3  # two live workers + 1
    store.unregister_consumer("w2", [QUEUE])
    store.r.rpop(QUEUE)
    store.r.rpop(QUEUE)
    store.dispatch([QUEUE])
    assert store.r.llen(QUEUE) == 2  # the setting's minimum
    assert store.backlog_length("big") == 100 - 4  # 3, then 1 more after two were taken


@pytest.mark.parametrize("status", ["cancelling", "cancelled", "expired", None])
def test_an_ended_or_gone_job_is_skipped_and_dropped(redis_server: RedisServer, status: str | None) -> None:
    store = store_for(redis_server, depth=1)
    add_job(store, "a", 3)
    add_job(store, "b", 3)
    if status is None:
        store.r.delete("genq:job:b")
    else:
        store.r.hset("genq:job:b", "status", status)
    taken = consume_all(store, depth=1)
    assert taken == [f"a:c{n:06d}" for n in range(3)]
    assert not store.r.exists(backlog_key("b")) and not store.r.exists(ring_key(QUEUE))


def test_cancel_drops_the_backlog_and_keeps_messages_once(redis_server: RedisServer) -> None:
    """Nothing lost or duplicated: every message is in a backlog or on the queue, never both."""
    from worker.queue.messages import message_ids

    store = store_for(redis_server, depth=2)
    for job in ("a", "b", "c"):
        add_job(store, job, 50)
        # publishing more of a job already in the ring does not add it twice
        store.enqueue(job, QUEUE, [[message(job, i) for i in range(50, 60)]])
    assert sorted(store.ring(QUEUE)) == ["a", "b", "c"]
    everywhere = Counter(task_id(m) for m in store.r.lrange(QUEUE, 0, -1))
    for job in "abc":
        everywhere.update(task_id(m) for m in store.r.lrange(backlog_key(job), 0, -1))
    assert everywhere == Counter(f"{j}:c{n:06d}" for j in "abc" for n in range(60))
    assert message_ids(store.r, [QUEUE], [backlog_key(j) for j in "abc"]) == set(everywhere)
    store.r.hset("genq:job:b", "status", "queued")
    store.request_cancel("b")
    assert not store.r.exists(backlog_key("b"))
    taken = consume_all(store, depth=2)
    left_of_b = [t for t in taken if t.startswith("b:")]
    assert len(left_of_b) <= 2  # only what was already on the queue: a worker drops those
    assert Counter(t for t in taken if not t.startswith("b:")) == Counter(
        f"{j}:c{n:06d}" for j in "ac" for n in range(60)
    )
