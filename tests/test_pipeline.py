"""The queue pipeline against a real Redis and real worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import RedisServer, WorkerProcess, genq, rows, wait_for, write_prompts


@pytest.fixture
def fp32_worker(redis_server: RedisServer, tmp_path: Path):  # type: ignore[no-untyped-def]
    worker = WorkerProcess(redis_server.url, tmp_path / "fp32.log", mode="fp32", name="fp32-a").start()
    yield worker
    worker.stop()


def test_cli_job_through_one_fp32_worker(
    redis_server: RedisServer, fp32_worker: WorkerProcess, tmp_path: Path
) -> None:
    """The issue's done-when: 60 items submitted, status reaches completed, collect gives 60 rows
    in input order, each once, all ok."""
    prompts = write_prompts(tmp_path / "in.jsonl", 60)
    job_id = (
        genq(redis_server.url, "submit", str(prompts), "--profile", "tiny-random", "--chunk-size", "8")
        .stdout.strip()
        .splitlines()[-1]
    )

    def completed() -> dict | None:  # type: ignore[type-arg]
        state = json.loads(genq(redis_server.url, "status", job_id, "--json").stdout)
        return state if state["status"] == "completed" else None

    state = wait_for(completed, timeout=120, what="job completed")
    assert state["counts"] == {
        "total": 60,
        "succeeded": 60,
        "errored": 0,
        "cancelled": 0,
        "expired": 0,
        "pending": 0,
    }
    assert state["tokens"]["completion"] > 0 and state["tokens_per_second"] > 0
    assert state["workers"]["fp32-a"]["items"] == 60
    out = tmp_path / "out.jsonl"
    genq(redis_server.url, "collect", job_id, "-o", str(out))
    got = rows(out)
    assert [r["id"] for r in got] == [f"p{i:04d}" for i in range(60)]
    assert [r["line"] for r in got] == list(range(1, 61))
    assert all(r["status"] == "ok" and r["mode"] == "fp32" and r["worker"] == "fp32-a" for r in got)
    # the live worker is listed
    listed = json.loads(genq(redis_server.url, "workers", "--json").stdout)
    assert [w["name"] for w in listed] == ["fp32-a"]
    assert listed[0]["mode"] == "fp32" and listed[0]["items"] >= 60
    # quiet by default: one log format (Celery's own lines and warnings too), no library chatter
    fp32_worker.stop()
    plain = [line for line in fp32_worker.log_path.read_text().splitlines() if line.strip()]
    not_json = [line for line in plain if not line.startswith("{")]
    assert not_json == ["worker: Warm shutdown (MainProcess)"], not_json
    events = [json.loads(line) for line in plain if line.startswith("{")]
    assert any(e.get("logger", "").startswith("celery") and "succeeded" in e["event"] for e in events)
    for noise in ("kernels", "Token indices sequence length", "Traceback", "Loading checkpoint"):
        assert not any(noise in line for line in plain), noise


def test_embedded_run_gives_the_same_rows(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.jsonl"
    genq(None, "run", str(prompts), "-o", str(out), "--profile", "tiny-random")
    got = rows(out)
    assert [r["id"] for r in got] == [f"p{i:04d}" for i in range(60)]
    assert all(r["status"] == "ok" and r["worker"] == "embedded" for r in got)
