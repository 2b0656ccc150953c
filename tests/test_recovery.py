"""The fleet's look for lost messages (worker/queue/recovery.py) against a real Redis, the real
submit path and kombu's own messages: what counts as quiet, what is published again (exactly the
pending items no message covers), and that a look reads one page of the job index, not all of it.
tests/test_faults.py has it with a real worker process; the lifecycle model walks it at random."""

from __future__ import annotations

import json
from pathlib import Path

from producer.client import Client
from tests.helpers import RedisServer, write_prompts
from worker.queue import recovery
from worker.store.keys import backlog_key

QUEUE = "genq.tiny-random.any"


def submit(client: Client, tmp_path: Path, job: str, n: int = 3) -> str:
    source = write_prompts(tmp_path / f"{job}.jsonl", n, prefix=job)
    return client.submit(source, profile="tiny-random", job_id=job, chunk_size=1).id


def dispatch_losing(client: Client, job: str, lost: str) -> None:
    """What a worker's dispatch does (the job's backlog onto its queue), except that the message of
    chunk ``lost`` goes nowhere: it was taken and never recorded."""
    r = client.store.r
    while (raw := r.lpop(backlog_key(job))) is not None:
        if json.loads(raw)["headers"]["id"].split("@")[0] != f"{job}:{lost}":
            r.lpush(QUEUE, raw)


def test_a_quiet_job_gets_exactly_its_lost_items_back_and_a_look_reads_one_page(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    client = Client(redis_server.url)
    store, r = client.store, client.store.r
    jobs = [submit(client, tmp_path, f"j{k}") for k in range(5)]
    dispatch_losing(client, "j3", "c000001")  # j3's item 1 has no message; the others wait in backlogs
    looks = []
    for _ in range(6):
        looks.append(recovery.recover_lost(store, quiet_for=0.0, page=2))
        # a look reads its page only: j3 is noted once its page (jobs 2 and 3) came round
        assert set(r.hkeys(recovery.QUIET)) <= {"j3"}
    found = [(k, done) for k, got in enumerate(looks) for done in got]
    # pages [j0 j1] [j2 j3] [j4 j0] [j1 j2] [j3 j4]: first seen quiet at look 2, found at look 5
    assert [(k, d.job_id, list(d.chunks.values())) for k, d in found] == [(4, "j3", [[1]])]
    # published as a new chunk of its own, on the job's queue
    (cid,) = found[0][1].chunks
    waiting = [
        json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1) + r.lrange(backlog_key("j3"), 0, -1)
    ]
    assert sum(t.startswith(f"j3:{cid}@") for t in waiting) == 1
    # looked at again while nothing changed: covered now, nothing more published
    for _ in range(6):
        assert recovery.recover_lost(store, quiet_for=0.0, page=2) == []
    # a quiet job deleted: its note goes once the look has been round the index
    client.delete("j3")
    for _ in range(3):
        recovery.recover_lost(store, quiet_for=0.0, page=2)
    assert r.hkeys(recovery.QUIET) == []
    assert len(jobs) == 5


def test_a_job_whose_messages_all_wait_is_never_published_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Quiet (nothing runs, its backlog is on a queue nobody takes) but nothing lost: nothing is
    published, however often it is looked at."""
    client = Client(redis_server.url)
    submit(client, tmp_path, "w1", n=4)
    dispatch_losing(client, "w1", lost="none")
    for _ in range(4):
        assert recovery.recover_lost(client.store, quiet_for=0.0) == []
    assert client.store.r.llen(QUEUE) == 4
