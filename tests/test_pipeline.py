"""The queue pipeline against a real Redis and a real worker process, and the embedded run
(`genq run` without a broker) compared with it row by row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RedisServer, WorkerProcess, genq, rows, wait_for, write_prompts

N = 60
VARYING = ("worker", "latency_ms")
"""The only fields of a row that may differ between two runs of the same item."""


@dataclass
class Served:
    prompts: Path
    state: dict[str, Any]
    rows: list[dict[str, Any]]
    listed: list[dict[str, Any]]
    log: str
    """The worker's whole log (it has stopped)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """60 items submitted through `genq submit`, served by one fp32 worker, collected."""
    folder = tmp_path_factory.mktemp("pipeline")
    server = RedisServer(folder / "redis")
    server.start()
    worker = WorkerProcess(server.url, folder / "fp32.log", mode="fp32", name="fp32-a")
    try:
        worker.start()
        prompts = write_prompts(folder / "in.jsonl", N)
        args = ["submit", str(prompts), "--profile", "tiny-random", "--chunk-size", "8"]
        job_id = genq(server.url, *args).stdout.strip().splitlines()[-1]

        def completed() -> dict[str, Any] | None:
            state = json.loads(genq(server.url, "status", job_id, "--json").stdout)
            return state if state["status"] == "completed" else None

        state = wait_for(completed, timeout=120, what="job completed")
        out = folder / "out.jsonl"
        genq(server.url, "collect", job_id, "-o", str(out))
        listed = json.loads(genq(server.url, "workers", "--json").stdout)
        worker.stop()
        yield Served(prompts, state, rows(out), listed, worker.log_path.read_text())
    finally:
        worker.stop()
        server.stop()


def test_cli_job_through_one_fp32_worker(served: Served) -> None:
    """The issue's done-when: 60 items submitted, status reaches completed, collect gives 60 rows
    in input order, each once, all ok."""
    state = served.state
    assert state["counts"] == {
        "total": N,
        "succeeded": N,
        "errored": 0,
        "cancelled": 0,
        "expired": 0,
        "pending": 0,
    }
    assert state["tokens"]["completion"] > 0 and state["tokens_per_second"] > 0
    assert state["workers"]["fp32-a"]["items"] == N
    got = served.rows
    assert [r["id"] for r in got] == [f"p{i:04d}" for i in range(N)]
    assert [r["line"] for r in got] == list(range(1, N + 1))
    assert all(r["status"] == "ok" and r["mode"] == "fp32" and r["worker"] == "fp32-a" for r in got)
    # the live worker is listed
    assert [w["name"] for w in served.listed] == ["fp32-a"]
    assert served.listed[0]["mode"] == "fp32" and served.listed[0]["items"] >= N
    # quiet by default: one log format (Celery's own lines and warnings too), no library chatter
    plain = [line for line in served.log.splitlines() if line.strip()]
    not_json = [line for line in plain if not line.startswith("{")]
    assert not_json == ["worker: Warm shutdown (MainProcess)"], not_json
    events = [json.loads(line) for line in plain if line.startswith("{")]
    assert any(e.get("logger", "").startswith("celery") and "succeeded" in e["event"] for e in events)
    for noise in ("kernels", "Token indices sequence length", "Traceback", "Loading checkpoint"):
        assert not any(noise in line for line in plain), noise


def test_embedded_run_gives_the_same_rows_as_a_worker(served: Served, tmp_path: Path) -> None:
    """`genq run` without a broker on the same file (other chunk sizes, no Redis, no Celery):
    item by item, every field of every row equals the worker's (id, line, status, text,
    finish_reason, usage, profile, mode, attempts), except who made it and how long it took."""
    out = tmp_path / "out.jsonl"
    genq(None, "run", str(served.prompts), "-o", str(out), "--profile", "tiny-random")
    got = rows(out)
    assert len(got) == len(served.rows) == N
    assert all(r["worker"] == "embedded" for r in got)
    for mine, theirs in zip(got, served.rows, strict=True):
        assert set(mine) == set(theirs), (mine, theirs)
        same = {k: v for k, v in mine.items() if k not in VARYING}
        assert same == {k: v for k, v in theirs.items() if k not in VARYING}, (mine, theirs)
        assert mine["text"] and mine["usage"]["completion_tokens"] > 0
