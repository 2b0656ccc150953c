"""A Redis on a Unix socket: written the way redis-py does (``unix:///path?db=0``) or the way
Celery and kombu do (``redis+socket:///path?virtual_host=0``), it serves the producer, the job store
and a real worker (once, ``unix://`` ended in a TypeError traceback: TCP keepalive was passed to a
Unix-socket connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import final_status
from tests.helpers import RedisServer, WorkerProcess, genq, wait_for, write_prompts
from worker.core.errors import ConfigError
from worker.store.connection import broker_url, store_url


def test_a_job_runs_over_a_unix_socket_written_either_way(redis_server: RedisServer, tmp_path: Path) -> None:
    sock = str(redis_server.socket)
    redis_py, kombu = f"unix://{sock}?db=0", f"redis+socket://{sock}?virtual_host=0"
    job = genq(redis_py, "submit", str(write_prompts(tmp_path / "p.jsonl", 6)), "--profile", "tiny-random")
    job_id = job.stdout.split()[-1]
    worker = WorkerProcess(kombu, tmp_path / "w.log", observe_url=redis_py).start()
    try:
        r = redis_server.client()
        assert wait_for(lambda: final_status(r, job_id), 120, what="the job") == "completed"
    finally:
        worker.stop()
    for url in (redis_py, kombu):
        shown = genq(url, "status", job_id)
        assert shown.returncode == 0 and "completed" in shown.stdout, shown.stderr
    assert "Traceback" not in worker.log_tail(100_000)


@pytest.mark.parametrize(
    ("given", "store", "broker"),
    [
        ("unix:///run/r.sock", "unix:///run/r.sock?db=0", "redis+socket:///run/r.sock?virtual_host=0"),
        ("unix:///run/r.sock?db=2", "unix:///run/r.sock?db=2", "redis+socket:///run/r.sock?virtual_host=2"),
        (
            "redis+socket:///run/r.sock?virtual_host=3",
            "unix:///run/r.sock?db=3",
            "redis+socket:///run/r.sock?virtual_host=3",
        ),
        (
            "unix:///run/r.sock?db=1&password=s3cret",
            "unix://:s3cret@/run/r.sock?db=1",
            "redis+socket://:s3cret@/run/r.sock?virtual_host=1",
        ),
        ("redis://h:6379/0", "redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_socket_urls_are_written_as_each_client_reads_them(given: str, store: str, broker: str) -> None:
    assert (store_url(given), broker_url(given)) == (store, broker)


def test_a_socket_url_with_an_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="only db") as caught:
        store_url("unix:///run/r.sock?db=0&password=s3cret&colour=red")
    assert "s3cret" not in str(caught.value)
