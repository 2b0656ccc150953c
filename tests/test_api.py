"""The Python API and the OpenAI batch format, against one real Redis and one real worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import Client
from tests.helpers import RedisServer, WorkerProcess, genq, rows


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, WorkerProcess]]:
    folder = tmp_path_factory.mktemp("api")
    server = RedisServer(folder / "redis")
    server.start()
    worker = WorkerProcess(server.url, folder / "worker.log", mode="fp32", name="api-worker").start()
    try:
        yield server, worker
    finally:
        worker.stop()
        server.stop()


def test_python_api_submit_wait_results(stack: tuple[RedisServer, WorkerProcess]) -> None:
    server, _ = stack
    client = Client(server.url)
    records = [{"id": f"r{i}", "prompt": f"fever {i} and cough", "max_new_tokens": 6} for i in range(25)]
    records.append({"id": "chat", "messages": [{"role": "user", "content": "what is aspirin?"}]})
    job = client.submit(records, profile="tiny-random", chunk_size=5)
    state = job.wait(timeout=120)
    assert state.status == "completed" and state.counts.succeeded == 26
    results = list(job.results())
    assert [r.id for r in results] == [r["id"] for r in records]
    assert [r.line for r in results] == list(range(1, 27))
    assert all(r.ok and r.usage.completion_tokens > 0 for r in results)
    assert results[0].usage.completion_tokens <= 6
    assert job.id in [s.spec.job_id for s in client.jobs()]
    assert client.workers()[0]["name"] == "api-worker"


def test_openai_batch_in_and_out(stack: tuple[RedisServer, WorkerProcess], tmp_path: Path) -> None:
    server, _ = stack
    src = tmp_path / "batch.jsonl"
    lines = []
    for i in range(6):
        if i % 2:
            body = {
                "model": "x",
                "messages": [{"role": "user", "content": f"symptoms of flu {i}"}],
                "max_tokens": 5,
            }
            url = "/v1/chat/completions"
        else:
            body = {"model": "x", "prompt": f"the patient {i}", "max_tokens": 5}
            url = "/v1/completions"
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    src.write_text("\n".join(lines) + "\n")
    job_id = genq(server.url, "submit", str(src), "--profile", "tiny-random").stdout.strip().splitlines()[-1]
    Client(server.url).job(job_id).wait(timeout=120)
    out = tmp_path / "out.jsonl"
    genq(server.url, "collect", job_id, "-o", str(out), "--format", "openai")
    got = rows(out)
    assert [r["custom_id"] for r in got] == [f"req-{i}" for i in range(6)]
    for i, row in enumerate(got):
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        if i % 2:
            assert body["object"] == "chat.completion" and isinstance(
                body["choices"][0]["message"]["content"], str
            )
        else:
            assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
        assert body["usage"]["completion_tokens"] <= 5
        assert (
            body["usage"]["total_tokens"]
            == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )


def test_collect_mid_job_writes_the_finished_part(tmp_path: Path) -> None:
    """No worker for this profile's queue: nothing finishes, collect says how much is pending."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        src = tmp_path / "in.jsonl"
        src.write_text(
            "".join(json.dumps({"id": f"x{i}", "prompt": "fever"}) + "\n" for i in range(5)) + "not json\n"
        )
        job_id = genq(
            server.url, "submit", str(src), "--profile", "tiny-random", "--skip-invalid"
        ).stdout.split()[-1]
        out = tmp_path / "out.jsonl"
        proc = genq(server.url, "collect", job_id, "-o", str(out))
        assert "5 pending" in proc.stderr
        got = rows(out)
        assert len(got) == 1 and got[0]["status"] == "error" and got[0]["line"] == 6
        assert got[0]["error"]["type"] == "invalid_input" and "line 6" in got[0]["error"]["message"]
        state = json.loads(genq(server.url, "status", job_id, "--json").stdout)
        assert (
            state["counts"]["errored"] == 1
            and state["counts"]["pending"] == 5
            and state["status"] == "in_progress"
        )
    finally:
        server.stop()


def test_wait_wakes_when_the_job_ends_not_at_its_next_poll(redis_server: RedisServer) -> None:
    """The store publishes a job's final status; `Job.wait` subscribes before its first read, so
    it returns as soon as the job ends even with a 60 s poll (here the items are closed from a
    second thread a second after the wait began: no worker runs it, so the cancel ends it)."""
    client = Client(redis_server.url)
    job = client.submit(
        [{"id": "a", "prompt": "fever"}, {"id": "b", "prompt": "cough"}], profile="tiny-random"
    )
    ender = threading.Timer(1.0, lambda: client.store.request_cancel(job.id))
    ender.start()
    started = time.monotonic()
    try:
        state = job.wait(poll=60, timeout=120)
    finally:
        ender.join()
    assert state.status == "cancelled" and state.counts.cancelled == 2
    assert time.monotonic() - started < 30, "woken by the 60 s poll, not by the job's end"
