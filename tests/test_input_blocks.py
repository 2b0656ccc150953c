"""A job's inputs in Redis: a block of items per stored value (worker/store/blocks.py).

Redis holds work in flight, not whole jobs: what a submit leaves in Redis per item is bounded
here by its mechanism (how many values a job's inputs take, and their bytes as Redis counts
them), not by a clock; `python -m bench.submit --json` and `python -m bench.drain --json` give
the figures at a million items."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.drain import feed
from bench.submit import write_input
from producer import Client
from tests.helpers import RedisServer
from worker.store import RedisStore, blocks
from worker.store.drain import result_digest
from worker.store.keys import all_job_keys, job_key

INPUT_BYTES_PER_ITEM = 60
"""The bound on an input's bytes in Redis (``MEMORY USAGE`` of the inputs hash ÷ items) for the
benchmark's prompts (about 110 bytes a line, 160 as stored Item JSON): one hash field per item
took about 230."""

REDIS_BYTES_PER_ITEM = 150
"""The bound on what a submit leaves in Redis per item, counted key by key (``MEMORY USAGE`` of
every key of the job: inputs, the chunk messages waiting in its backlog, its hash and claims);
about 316 with one field per item, of which the chunk messages (a Celery envelope of about
1.2 KB per chunk of 16) are about 86."""


def test_pack_and_unpack_round_trip() -> None:
    rows = [(i, f'{{"index":{i},"id":"x{i}","prompt":"p\\n{i}"}}') for i in range(blocks.BLOCK + 3)]
    packed = list(blocks.pack(rows))
    assert [b for b, _ in packed] == [0, 1]
    assert [row for b, value in packed for row in blocks.unpack(b, value)] == rows
    with pytest.raises(ValueError, match="first item"):
        list(blocks.pack(rows[1:]))
    with pytest.raises(ValueError, match="without gaps"):
        list(blocks.pack(rows[:3] + rows[4:]))


def test_a_submit_stores_its_inputs_a_block_per_value(redis_server: RedisServer, tmp_path: Path) -> None:
    """A submit of 5,000 items writes 100 values of inputs (not 5,000 fields), whose bytes and
    all of the job's keys per item stay under the bounds above; a worker's read gives back
    exactly the items submitted, from any block and any chunk shape."""
    n = 5000
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    r = redis_server.client()
    client = Client(redis_server.url)
    job = client.submit(src, profile="tiny-random", job_id="blocks", chunk_size=16)
    key = job_key("blocks", "inputs")
    assert r.hlen(key) == n // blocks.BLOCK
    inputs = int(r.memory_usage(key, samples=0)) / n
    everything = sum(int(r.memory_usage(k, samples=0) or 0) for k in all_job_keys("blocks")) / n
    print(f"inputs: {inputs:.1f} B/item; the job's keys: {everything:.1f} B/item")
    assert inputs < INPUT_BYTES_PER_ITEM
    assert everything < REDIS_BYTES_PER_ITEM
    store = RedisStore(redis_server.url)
    lines = src.read_text().splitlines()
    for indices in ([0], [49, 50], list(range(4990, 5000)), [7, 4321, 1234]):
        items = store.items(job.id, indices)
        assert [it.index for it in items] == indices
        assert [it.id for it in items] == [f"q{i:08d}" for i in indices]
        assert all(f'"{it.prompt}"' in lines[it.index] for it in items)


def test_drained_blocks_leave_redis_and_an_errors_input_stays(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Confirming a drain deletes a block once every item of it is drained (block 0 stays), and
    moves a drained error's input apart, where a retry's worker still reads it."""
    n = 3 * blocks.BLOCK
    src = tmp_path / "in.jsonl"
    write_input(src, n)
    client = Client(redis_server.url)
    job = client.submit(src, profile="tiny-random", job_id="drain")
    bad = blocks.BLOCK + 7
    feed(redis_server.url, job.id, n, rate=float("inf"), errors={bad})
    store = client.store
    r = redis_server.client()
    stored = r.hgetall(job_key(job.id, "results"))
    digest = {int(i): raw for i, raw in stored.items()}

    def confirm(indices: range) -> None:
        store.confirm_drained(job.id, [(i, result_digest(digest[i]), i == bad) for i in indices])

    confirm(range(0, 2 * blocks.BLOCK - 1))  # all of block 0, block 1 but its last item
    assert sorted(r.hkeys(job_key(job.id, "inputs"))) == ["b0", "b1", "b2"]
    confirm(range(2 * blocks.BLOCK - 1, n))
    assert r.hkeys(job_key(job.id, "inputs")) == ["b0"]
    assert r.hkeys(job_key(job.id, "kept_inputs")) == [str(bad)]
    assert [it.index for it in store.items(job.id, [bad])] == [bad]
    assert store.items(job.id, [bad + 1]) == []  # drained: nothing left to do for it


def test_a_job_stored_by_an_older_genq_is_still_served(redis_server: RedisServer) -> None:
    """A job whose inputs an older genq stored one field per item: a new worker still reads
    them, and a drain still frees them (item 0's stays)."""
    from worker.core.schema import Item, JobSpec

    store = RedisStore(redis_server.url)
    made = [Item(index=i, id=f"old{i}", prompt=f"p{i}") for i in range(4)]
    spec = JobSpec(job_id="old", profile="tiny-random", chunk_size=2, total=4)
    store.begin(spec.model_copy(update={"total": 0}))
    r = redis_server.client()
    r.hset(job_key("old", "inputs"), mapping={str(it.index): it.model_dump_json() for it in made})
    store.complete_inputs(spec)
    store.finish_submit("old")
    assert store.items("old", [3, 1]) == [made[3], made[1]]
    feed(redis_server.url, "old", 4, rate=float("inf"))
    results = r.hgetall(job_key("old", "results"))
    store.confirm_drained("old", [(int(i), result_digest(raw), False) for i, raw in results.items()])
    assert r.hkeys(job_key("old", "inputs")) == ["0"]
