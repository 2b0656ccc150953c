"""OpenAI batch workflows against a real Redis and a real worker (issue 14): the errors file, the
Batch object, and `genq estimate` with the speed the worker measured and published."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import RedisServer, WorkerProcess, genq, rows, wait_for
from tests.schemas import ONE_THREAD, request, schema_request


def test_errors_file_batch_object_and_estimate(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url
    too_long = request(5, {"messages": [{"role": "user", "content": "pain " * 400}], "max_tokens": 4})
    lines = [schema_request(i, max_tokens=48) for i in range(5)] + [too_long]
    lines += [request(6, {"prompt": "the dose of aspirin", "max_tokens": 24}, url="/v1/completions")]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(lines) + "\n")

    before = json.loads(genq(url, "estimate", str(src), "--profile", "tiny-random", "--json").stdout)
    assert before["items"] == 7 and before["too_long"] == 1
    assert not [t for t in before["time"] if t["source"].startswith("worker:")]  # no worker has run
    assert before["tokens"]["completion_bound"] == 5 * 48 + 24
    assert before["memory"]["weights_bytes"]["fp32"] > 0

    worker = WorkerProcess(url, tmp_path / "w.log", name="w-batch", env=ONE_THREAD).start()
    try:
        job = genq(url, "submit", str(src), "--profile", "tiny-random", "--chunk-size", "4").stdout.split()[
            -1
        ]
        queued = json.loads(genq(url, "status", job, "--json", "--format", "openai").stdout)
        assert queued["object"] == "batch" and queued["id"] == job
        assert queued["status"] in ("in_progress", "completed")

        def done() -> bool:
            batch = json.loads(genq(url, "status", job, "--json", "--format", "openai").stdout)
            return bool(batch["status"] == "completed")

        wait_for(done, timeout=120, interval=0.5, what="job completed")
        out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
        genq(url, "collect", job, "-o", str(out), "--format", "openai", "--errors-file", str(errs))
        ok, bad = rows(out), rows(errs)
        assert [r["custom_id"] for r in ok] == ["r000", "r001", "r002", "r003", "r004", "r006"]
        assert [r["custom_id"] for r in bad] == ["r005"]
        assert bad[0]["response"] is None and bad[0]["error"]["code"] == "context_length_exceeded"
        assert ok[-1]["response"]["body"]["object"] == "text_completion"
        assert all(r["response"]["body"]["model"] == "tiny-random:tiny-random-lora" for r in ok)

        batch = json.loads(genq(url, "status", job, "--json", "--format", "openai").stdout)
        assert batch["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
        assert batch["output_file_id"] == str(out.resolve()) and batch["error_file_id"] == str(errs.resolve())
        assert batch["endpoint"] == "/v1/chat/completions"
        assert batch["created_at"] <= batch["in_progress_at"] <= batch["completed_at"]
        assert batch["cancelled_at"] is None and batch["expired_at"] is None

        def measured() -> dict | None:  # type: ignore[type-arg]
            found = json.loads(genq(url, "estimate", str(src), "--profile", "tiny-random", "--json").stdout)
            published = any(t["source"] == "worker:w-batch" for t in found["time"])
            return found if published else None

        after = wait_for(measured, timeout=30, interval=1.0, what="the worker's speed published")
        (speed,) = after["time"]  # one class: an embedded run's figure of this CPU, if any, is older
        assert speed["mode"] == "fp32" and speed["device"] == "cpu" and speed["source"] == "worker:w-batch"
        assert speed["tokens_per_second"] > 0 and speed["live_workers"] == 1
        bound = after["tokens"]["completion_bound"]
        assert abs(speed["seconds"] - bound / speed["tokens_per_second"]) < 0.2
        assert after["fleet"]["live_workers"] == 1
        table = genq(url, "estimate", str(src), "--profile", "tiny-random").stdout
        for words in ("tokens in", "tokens out", "memory", "fp32 on cpu", "tok/s", "all 1 live workers"):
            assert words in table, table
    finally:
        worker.stop()
