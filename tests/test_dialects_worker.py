"""The three hosted-API dialects through real Redis and a real `genq-worker start` process, with a
profile of one's own given by path to both the worker and the producer: each job's lines come
back from `genq collect` (default `--format auto`) in their own API's shape, checked field by
field and by the official SDKs' types, and each job is a valid `openai.types.Batch`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.apishapes import (
    DATA,
    check_anthropic_row,
    check_batch_object,
    check_chat_row,
    check_responses_row,
    requests,
)
from tests.helpers import RedisServer, WorkerProcess, genq, rows, wait_for
from tests.schemas import ONE_THREAD

CHECKS = {"responses": check_responses_row, "anthropic": check_anthropic_row, "azure": check_chat_row}
ENDPOINTS = {"responses": "/v1/responses", "anthropic": "/v1/messages", "azure": "/v1/chat/completions"}


def test_dialects_through_a_worker(redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url
    own = tmp_path / "my-model.yaml"  # outside configs/: found by path, named after the file
    own.write_text("tiny: true\nlimits: {max_new_tokens: 256, context_length: 256}\n")
    worker = WorkerProcess(url, tmp_path / "w.log", profile=str(own), name="w-dialects", env=ONE_THREAD)
    worker.start()
    try:
        jobs = {}
        for name in CHECKS:
            expiry = ["--expires-in", "86400"] if name == "anthropic" else []
            submitted = genq(url, "submit", str(DATA / f"{name}_batch.jsonl"), "--profile", str(own), *expiry)
            jobs[name] = submitted.stdout.split()[-1]
            assert "to genq.my-model.any" in submitted.stderr
        for name, job in jobs.items():

            def batch(job: str = job) -> dict:  # type: ignore[type-arg]
                return dict(json.loads(genq(url, "status", job, "--json", "--format", "openai").stdout))

            wait_for(lambda: batch()["status"] == "completed", timeout=180, interval=0.5, what=f"{name} job")
            done = batch()
            check_batch_object(done, job, ENDPOINTS[name])
            total = len(requests(name))
            assert done["request_counts"] == {"total": total, "completed": total, "failed": 0}
            assert done["completion_window"] == ("24h" if name == "anthropic" else "none")
            assert done["metadata"] == {"profile": "my-model"}
            out = tmp_path / f"{name}.out.jsonl"
            genq(url, "collect", job, "-o", str(out))  # --format auto, the default
            got = rows(out)
            want = requests(name)
            assert [r["custom_id"] for r in got] == [w["custom_id"] for w in want]
            for row, request in zip(got, want, strict=True):
                CHECKS[name](row, request)
            after = check_batch_object(batch(), job, ENDPOINTS[name])
            assert after.output_file_id == str(out.resolve())
    finally:
        worker.stop()
