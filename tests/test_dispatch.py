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


# --- fair share across mode queues: a job pinned to a mode and an `any` job of one level ---------

FP32, NF4 = "genq.tiny-random.fp32", "genq.tiny-random.nf4"


def add_mode_job(store: RedisStore, job: str, n: int, mode: str) -> None:
    """A job of ``mode`` published as a submit publishes (its own ring; the dispatch targets of
    :func:`worker.queue.routing.publish_targets`)."""
    from worker.core.states import Priority, QueueMode
    from worker.queue.routing import publish_targets, queue_name

    spec = JobSpec(job_id=job, profile="tiny-random", chunk_size=1, total=n, mode=QueueMode(mode))
    store.r.hset(f"genq:job:{job}", mapping={"status": "queued", "spec": spec.model_dump_json(), "total": n})
    queue = queue_name("tiny-random", QueueMode(mode), Priority.NORMAL)
    targets = publish_targets("tiny-random", QueueMode(mode), Priority.NORMAL)
    store.enqueue(job, queue, [[message(job, i) for i in range(n)]], targets=targets)


def run_worker(store: RedisStore, mode: str) -> list[str]:
    """Play one worker of ``mode`` at the normal level: BRPOP's order (its mode's queue, then
    ``any``), then its dispatch after each chunk, until nothing is left."""
    from worker.core.states import Mode
    from worker.queue.routing import dispatch_targets, worker_queues

    queues = [
        q for q in worker_queues("tiny-random", Mode(mode)) if "." not in q.removeprefix("genq.tiny-random.")
    ]
    targets = dispatch_targets("tiny-random", Mode(mode), queues)
    taken: list[str] = []
    while True:
        raw = next((m for q in queues if (m := store.r.rpop(q)) is not None), None)
        if raw is None:
            return taken
        taken.append(task_id(raw))
        store.dispatch(targets)


def test_an_any_job_shares_a_worker_with_a_job_pinned_to_its_mode(redis_server: RedisServer) -> None:
    """A small `any` job submitted after a big fp32 one runs chunk by chunk in turn with it, not
    after it (kombu takes the worker's own mode's queue first: the `any` queue is never filled)."""
    store = store_for(redis_server, depth=2)
    store.register_consumer("w-fp32", [FP32, QUEUE], ttl=30)
    add_mode_job(store, "big", 60, "fp32")
    add_mode_job(store, "small", 6, "any")
    assert store.r.llen(QUEUE) == 0 and store.r.llen(NF4) == 0  # no nf4 worker: nothing waits there
    taken = run_worker(store, "fp32")
    jobs = [t.split(":")[0] for t in taken]
    last_small = max(i for i, j in enumerate(jobs) if j == "small")
    # the queue held two of big's chunks when small came; then turns: small is done after ~12 chunks
    assert last_small <= 2 + 2 * 6, jobs[:20]
    assert Counter(jobs) == {"big": 60, "small": 6}


def test_pinned_and_any_jobs_take_turns_job_by_job(redis_server: RedisServer) -> None:
    """Two `any` jobs and one fp32 job: each job gets its turn once per round (a third each), not
    half for the fp32 ring and a quarter for each `any` job."""
    store = store_for(redis_server, depth=1)
    store.register_consumer("w-fp32", [FP32, QUEUE], ttl=30)
    add_mode_job(store, "f", 30, "fp32")
    add_mode_job(store, "a1", 30, "any")
    add_mode_job(store, "a2", 30, "any")
    jobs = [t.split(":")[0] for t in run_worker(store, "fp32")]
    first = Counter(jobs[:45])
    assert all(13 <= first[j] <= 17 for j in ("f", "a1", "a2")), first


def test_an_any_job_goes_to_the_modes_that_have_workers(redis_server: RedisServer) -> None:
    """An `any` job is dispatched to the queue of each mode with a live worker, to none without."""
    store = store_for(redis_server, depth=2)
    add_mode_job(store, "a", 10, "any")
    assert store.r.llen(FP32) == store.r.llen(NF4) == store.r.llen(QUEUE) == 0
    assert store.backlog_length("a") == 10  # waits for a worker's first heartbeat
    store.register_consumer("w-nf4", [NF4, QUEUE], ttl=30)
    from worker.core.states import Mode
    from worker.queue.routing import dispatch_targets

    store.dispatch(dispatch_targets("tiny-random", Mode.NF4, [NF4, QUEUE]))
    assert store.r.llen(NF4) == 2 and store.r.llen(FP32) == 0
    taken = run_worker(store, "nf4")
    assert sorted(taken) == [f"a:c{n:06d}" for n in range(10)]


def test_a_worker_on_some_queues_registers_as_the_consumer_of_those_only(redis_server: RedisServer) -> None:
    """`celery -A worker.app worker -Q <the high queues>`: the worker's heartbeat registers it as
    a consumer of those two queues, not of all six (the dispatch depth of the others is not
    raised for a worker that never takes from them)."""
    from worker.core.profiles import load_profile
    from worker.core.states import Mode
    from worker.queue.app import make_app
    from worker.queue.routing import worker_queues
    from worker.queue.task import consumed_queues, serve
    from worker.runtime import Runtime
    from worker.store.keys import consumers_key

    settings = Settings.from_env({"GENQ_BROKER_URL": redis_server.url})
    app = make_app(settings)
    every = worker_queues("tiny-random", Mode.FP32)
    high = [q for q in every if q.endswith(".high")]
    assert consumed_queues(every, app) == []  # no -Q: Celery's default queue only
    app.amqp.queues.select(high)  # what -Q does
    assert consumed_queues(every, app) == high
    runtime = Runtime(settings, name="w-high")
    runtime.profile, runtime.mode = load_profile("tiny-random"), Mode.FP32
    serve(runtime, consumed_queues(every, app))
    runtime.beat()
    r = redis_server.client()
    assert [q for q in every if r.zscore(consumers_key(q), "w-high") is not None] == high


# --- an `any` job's chunks on the queue of a mode whose last worker is gone ------------------------


def test_an_any_jobs_chunks_left_on_a_dead_modes_queue_go_to_a_live_mode(redis_server: RedisServer) -> None:
    """The only nf4 worker dies with three of an `any` job's chunks dispatched to its queue: the
    next heartbeat of an fp32 worker gives them back (their job's backlog, oldest first) and
    dispatches them to the fp32 queue, so the fp32 worker runs the whole job in order; a job
    pinned to nf4 keeps its message on the nf4 queue.  Real messages (Celery's and kombu's
    envelopes, as a submit publishes them), a real worker runtime's heartbeat."""
    from worker.core.profiles import load_profile
    from worker.core.states import Mode
    from worker.queue.app import make_app
    from worker.queue.publish import publish_chunks
    from worker.queue.routing import worker_queues
    from worker.queue.task import serve
    from worker.runtime import Runtime
    from worker.store.keys import consumers_key

    settings = Settings.from_env({"GENQ_BROKER_URL": redis_server.url, "GENQ_QUEUE_DEPTH": "4"})
    app = make_app(settings)
    store = RedisStore(settings=settings)
    r = redis_server.client()

    def job(name: str, n: int, mode: str) -> None:
        spec = JobSpec(job_id=name, profile="tiny-random", chunk_size=1, total=n, mode=mode, incarnation="5e")
        r.hset(
            f"genq:job:{name}", mapping={"status": "in_progress", "spec": spec.model_dump_json(), "inc": "5e"}
        )
        publish_chunks(spec, {f"c{i:06d}": [i] for i in range(n)}, app, store=store)

    try:
        store.register_consumer("w-nf4", [NF4, QUEUE], ttl=30)
        job("p", 1, "nf4")
        job("a", 10, "any")
        assert [task_id(m) for m in r.lrange(NF4, 0, -1)] == [f"a:c{n:06d}@5e" for n in (2, 1, 0)] + [
            "p:c000000@5e"
        ]
        assert r.llen(FP32) == 0 and store.backlog_length("a") == 7

        runtime = Runtime(settings, name="w-fp32")
        runtime.profile, runtime.mode = load_profile("tiny-random"), Mode.FP32
        serve(runtime, worker_queues("tiny-random", Mode.FP32))
        runtime.beat()  # the nf4 worker still lives: nothing of its queue moves
        assert r.llen(NF4) == 4 and store.backlog_length("a") == 7 - 4 and r.llen(FP32) == 4

        r.zadd(consumers_key(NF4), {"w-nf4": 1.0})  # its heartbeat lapsed: it is gone
        runtime.beat()
        assert [task_id(m) for m in r.lrange(NF4, 0, -1)] == ["p:c000000@5e"]  # pinned: stays
        taken = run_worker(store, "fp32")
        assert taken == [f"a:c{n:06d}@5e" for n in (3, 4, 5, 6, 0, 1, 2, 7, 8, 9)]
        assert store.backlog_length("a") == 0 and r.llen(NF4) == 1
    finally:
        app.close()


@pytest.mark.parametrize("change", ["cancelled", "another incarnation"])
def test_an_ended_or_replaced_any_jobs_messages_on_a_dead_modes_queue_are_dropped(
    redis_server: RedisServer, change: str
) -> None:
    """What would be given back belongs to a job that ended, or to an incarnation since replaced:
    it is dropped (as dispatch drops such a job's backlog), never handed to a live mode."""
    from worker.core.states import Mode
    from worker.queue.routing import rescue_targets
    from worker.store.keys import consumers_key

    store = store_for(redis_server, depth=2)
    r = redis_server.client()
    store.register_consumer("w-nf4", [NF4, QUEUE], ttl=30)
    spec = JobSpec(job_id="x", profile="tiny-random", chunk_size=1, total=3, mode="any", incarnation="7")
    r.hset("genq:job:x", mapping={"status": "in_progress", "spec": spec.model_dump_json(), "inc": "7"})
    for n in range(3):  # addressed to the any queue, as kombu addresses an any job's messages
        raw = {"headers": {"id": f"x:c{n:06d}@7"}, "properties": {"delivery_info": {"routing_key": QUEUE}}}
        store.enqueue("x", QUEUE, [[json.dumps(raw)]], inc="7", targets=[(NF4, QUEUE)])
    assert r.llen(NF4) == 2 and store.backlog_length("x") == 1
    r.zadd(consumers_key(NF4), {"w-nf4": 1.0})
    if change == "cancelled":
        r.hset("genq:job:x", "status", "cancelled")
    else:
        r.hset("genq:job:x", "inc", "8")
    store.register_consumer("w-fp32", [FP32, QUEUE], ttl=30)
    assert store.rescue(rescue_targets("tiny-random", Mode.FP32, [FP32, QUEUE])) == 0
    assert r.llen(NF4) == 0 and store.backlog_length("x") == 1  # dropped; the backlog is dispatch's
    assert store.dispatch([(FP32, QUEUE)]) == 0 and r.llen(FP32) == 0  # nor does it reach fp32
