"""Redis errors are never read as an answer: `Client.delete` does not take a Redis that refuses or
fails for "no such job", and the exporter's series do not read 0 when Redis does not answer."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from tests.helpers import RedisServer, free_port, genq, write_prompts
from worker.core.settings import Settings
from worker.queue.exporter import serve
from worker.store import RedisStore
from worker.store.keys import backlog_key, job_key

PROFILE = "tiny-random"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("genq_")
    }


@pytest.fixture
def exporter(redis_server: RedisServer) -> Iterator[int]:
    port = free_port()
    store = RedisStore(redis_server.url, settings=Settings.from_env({}), retry_seconds=1)
    server = serve(store, port, "127.0.0.1")
    try:
        yield port
    finally:
        server.shutdown()


def test_exporter_reports_redis_memory_and_nothing_but_store_up_when_redis_is_gone(
    redis_server: RedisServer, exporter: int, tmp_path: object
) -> None:
    r = redis_server.client()
    r.config_set("maxmemory", str(64 * 2**20))
    got = scrape(exporter)
    assert got["genq_store_up"] == 1
    assert got["genq_redis_max_memory_bytes"] == 64 * 2**20
    used = int(r.info("memory")["used_memory"])
    assert 0.5 * used < got["genq_redis_used_memory_bytes"] < 2 * used
    assert "genq_chunks_unacked" in got

    redis_server.stop()
    gone = scrape(exporter)
    assert gone == {"genq_store_up": 0}, "a Redis that does not answer must not read as zeros"


def test_delete_refused_by_redis_is_an_error_not_no_such_job(
    redis_server: RedisServer, tmp_path: object
) -> None:
    """A Redis that fails a read of the delete's step (here: an ACL that refuses HMGET) makes
    `delete` raise and leaves the job whole, its backlog and queued messages included; it never
    drops the job's keys without withdrawing its queued messages."""
    from pathlib import Path

    job = genq(
        redis_server.url,
        "submit",
        str(write_prompts(Path(str(tmp_path)) / "p.jsonl", 40)),
        "--profile",
        PROFILE,
    ).stdout.strip()
    r = redis_server.client()
    r.acl_setuser(
        "nohget", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all", "-hmget"]
    )
    port = redis_server.port
    refused = Client(f"redis://nohget:pw@127.0.0.1:{port}/0", retry_seconds=1)
    waiting = r.llen(backlog_key(job))
    assert waiting > 0  # an any job's chunks wait in its backlog until a worker dispatches them
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        refused.delete(job)  # the one step that deletes and withdraws stops before any write
    assert r.exists(job_key(job)) and r.llen(backlog_key(job)) == waiting
    gone = Client(redis_server.url).delete(job)
    assert gone.keys > 0 and gone.messages > 0 and not r.exists(job_key(job))


def test_delete_of_a_job_that_does_not_exist_is_not_an_error(redis_server: RedisServer) -> None:
    gone = Client(redis_server.url).delete("no-such-job")
    assert (gone.keys, gone.messages) == (0, 0)
