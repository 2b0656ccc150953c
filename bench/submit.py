"""Submitting millions: the real ``genq submit`` against a real redis-server, timed and measured.

    python -m bench.submit [--json] [--items 1000000] [--chunk-size 16] [--collect]

Writes a native JSONL file of ``--items`` short medical prompts (about 110 bytes a line), starts
its own ``redis-server`` (no persistence), then runs ``genq submit FILE --profile tiny-random`` in
a subprocess and reports:

* ``submit_seconds``: wall time of the whole command (validation, inputs, chunk publishing);
* ``peak_rss_mb``: the submitting process's peak resident memory (``ru_maxrss`` of the child);
* ``redis_bytes_per_item``: Redis' ``used_memory`` growth ÷ items after the submit, and
  ``redis_bytes_per_item_done`` once every item has a result: the results are written through the
  store's own ``record`` (the Lua script workers use) with a 32-token answer each, since no
  worker on two cores generates a million answers in a benchmark's time;
* ``chunks``: messages in the queue (one per chunk: each is enqueued once);
* with ``--collect``: ``collect_seconds`` and ``collect_peak_rss_mb`` of ``genq collect`` of the
  finished job (results streamed out in input order).

No worker runs: the figures are the producer's and Redis' alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import emit, machine, table
from tests.cluster import REPO, RedisServer

WORDS = [
    "fever",
    "cough",
    "the patient",
    "blood pressure",
    "dose of aspirin",
    "chest pain",
    "diabetes",
    "asthma",
]


def write_input(path: Path, n: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            fh.write(json.dumps({"id": f"q{i:08d}", "prompt": prompt, "max_new_tokens": 32}) + "\n")
    return path.stat().st_size


def used_memory(server: RedisServer) -> int:
    return int(server.client().info("memory")["used_memory"])


def run_child(args: list[str], env: dict[str, str], folder: Path) -> tuple[float, float, str]:
    """Run a genq command; returns (seconds, that process's own peak RSS in MB, its stdout)."""
    out, err = folder / "child.out", folder / "child.err"
    started = time.perf_counter()
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *args], cwd=REPO, env=env, stdout=o, stderr=e
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max of all children
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"genq {' '.join(args)} failed: {err.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, out.read_text()


def finish_every_item(url: str, job_id: str, total: int) -> None:
    """Record a 32-token answer for every item through the store's own Lua script."""
    from worker.core.schema import ItemResult, Usage
    from worker.core.settings import Settings
    from worker.core.states import FinishReason, ItemStatus, Mode
    from worker.store import RedisStore

    store = RedisStore(settings=Settings.from_env({"GENQ_BROKER_URL": url}))
    text = "the patient should rest, drink fluids and see a doctor if the fever lasts more than three days"
    page = 1000
    for start in range(0, total, page):
        results = [
            ItemResult(
                index=i,
                id=f"q{i:08d}",
                line=i + 1,
                status=ItemStatus.OK,
                text=text,
                finish_reason=FinishReason.LENGTH,
                usage=Usage(prompt_tokens=20, completion_tokens=32),
                profile="tiny-random",
                mode=Mode.FP32,
                worker="bench",
                attempts=1,
                latency_ms=812.5,
            )
            for i in range(start, min(start + page, total))
        ]
        store.record(job_id, results, "bench")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--collect", action="store_true", help="also finish every item and time genq collect")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="genq-bench-submit-") as tmp:
        folder = Path(tmp)
        src = folder / "prompts.jsonl"
        size = write_input(src, args.items)
        server = RedisServer(folder / "redis", appendonly=False)
        server.start()
        try:
            env = {**os.environ, "GENQ_BROKER_URL": server.url, "GENQ_LOG_FORMAT": "json"}
            base = used_memory(server)
            seconds, rss, stdout = run_child(
                ["submit", str(src), "--profile", "tiny-random", "--chunk-size", str(args.chunk_size)],
                env,
                folder,
            )
            job_id = stdout.strip().splitlines()[-1]
            after_submit = used_memory(server)
            r = server.client()
            queue = "genq.tiny-random.any"
            # the dispatcher keeps a few on the queue; the rest wait in the job's backlog
            chunks = int(r.llen(queue)) + int(r.llen(f"genq:job:{job_id}:backlog"))
            result: dict[str, Any] = {
                "bench": "submit",
                "items": args.items,
                "input_mb": round(size / 1e6, 1),
                "chunk_size": args.chunk_size,
                "chunks": chunks,
                "submit_seconds": round(seconds, 2),
                "items_per_second": round(args.items / seconds),
                "peak_rss_mb": round(rss, 1),
                "redis_bytes_per_item": round((after_submit - base) / args.items, 1),
                "machine": machine(),
            }
            if args.collect:
                r.delete(queue)  # no worker will take them; the queue's bytes are not a job's
                finish_every_item(server.url, job_id, args.items)
                done = used_memory(server)
                result["redis_bytes_per_item_done"] = round((done - base) / args.items, 1)
                out = folder / "out.jsonl"
                cs, crss, _ = run_child(["collect", job_id, "-o", str(out)], env, folder)
                result["collect_seconds"] = round(cs, 2)
                result["collect_peak_rss_mb"] = round(crss, 1)
        finally:
            server.stop()
    table(
        "genq submit",
        [
            ["items", "seconds", "items/s", "peak RSS MB", "Redis B/item"],
            [str(result[k]) for k in ("items", "submit_seconds", "items_per_second", "peak_rss_mb")]
            + [str(result["redis_bytes_per_item"])],
        ],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
