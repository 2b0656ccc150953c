"""Redis memory while a job runs: drained by `genq collect --follow`, or collected at the end.

    python -m bench.drain [--json] [--items 1000000] [--rate 2000] [--answer-bytes 1000]

Twice, each time with a fresh ``redis-server`` (no persistence): ``genq submit`` of ``--items``
short prompts (the file of ``bench.submit``), then a fleet's writes at a steady ``--rate`` (items
per second): chunk by chunk, each chunk's message taken off the job's backlog (as a worker takes
it) and its results written through the store's own ``record`` script (the Lua script workers
use), each answer ``--answer-bytes`` of text.  No model runs: two cores cannot generate a
million answers in a benchmark's time, and the figures are Redis' and the collector's alone.

* ``follow``: a real ``genq collect JOB -o out.jsonl --follow`` process runs from the submit on;
* ``plain``: nothing drains (the fleet writes as fast as it can: the peak is the same);
  ``genq collect JOB -o out.jsonl`` runs once the job has finished.

Reports ``redis_peak_mb_follow`` and ``redis_peak_mb_plain`` (the largest ``used_memory`` seen,
sampled every 0.1 s, and Redis' own ``used_memory_peak``: the larger), their ratio, the
collectors' peak RSS (``ru_maxrss`` of each child), their wall time, and whether both outputs
are complete, in input order, each item once, and byte for byte the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from bench.fixtures import emit, machine, table
from bench.submit import run_child, write_input
from tests.cluster import REPO, RedisServer

QUEUE = "genq.tiny-random.any"


def answer_text(n_bytes: int) -> str:
    base = "the patient should rest, drink fluids and see a doctor if the fever lasts more than three days; "
    return (base * (n_bytes // len(base) + 1))[:n_bytes]


def feed(
    url: str,
    job_id: str,
    total: int,
    *,
    rate: float,
    answer_bytes: int = 1000,
    chunk_size: int = 16,
    errors: Collection[int] = (),
    only: Collection[int] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Write a result for every item (or those in ``only``) at ``rate`` items/s, a chunk per
    ``record`` call, as a fleet would: an ok ``answer_bytes`` answer, or a retryable
    ``generation_error`` for indices in ``errors``.  Returns results newly written."""
    from worker.core.schema import ErrorInfo, ItemResult, Usage
    from worker.core.settings import Settings
    from worker.core.states import ErrorCode, FinishReason, ItemStatus, Mode
    from worker.store import RedisStore
    from worker.store.keys import backlog_key

    store = RedisStore(settings=Settings.from_env({"GENQ_BROKER_URL": url}))
    text = answer_text(answer_bytes)
    todo = sorted(only) if only is not None else range(total)
    written = 0
    started = time.monotonic()
    for n, start in enumerate(range(0, len(todo), chunk_size)):
        if stop is not None and stop.is_set():
            break
        if only is None:  # a worker takes the chunk's message
            store.r.lpop(backlog_key(job_id)) or store.r.rpop(QUEUE)
        results = []
        for i in todo[start : start + chunk_size]:
            common: dict[str, Any] = {"index": i, "id": f"q{i:08d}", "line": i + 1, "profile": "tiny-random"}
            common.update(mode=Mode.FP32, worker="bench-fleet", attempts=1, latency_ms=812.5)
            if i in errors:
                error = ErrorInfo(type=ErrorCode.GENERATION_ERROR, message="injected by bench.drain")
                results.append(ItemResult(status=ItemStatus.ERROR, error=error, **common))
            else:
                usage = Usage(prompt_tokens=20, completion_tokens=answer_bytes // 4)
                ok: dict[str, Any] = {"text": text, "finish_reason": FinishReason.LENGTH, "usage": usage}
                results.append(ItemResult(status=ItemStatus.OK, **ok, **common))
        written += store.record(job_id, results, "bench-fleet")
        ahead = started + (n + 1) * chunk_size / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return written


class MemorySampler(threading.Thread):
    """The largest ``used_memory`` of a Redis, sampled every ``interval`` seconds."""

    def __init__(self, server: RedisServer, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.r = server.client()
        self.interval = interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, int(self.r.info("memory")["used_memory"]))

    def finish(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, int(self.r.info("memory")["used_memory_peak"]))


def check_output(path: Path, total: int) -> dict[str, Any]:
    """Complete, in input order, each item once (streamed: flat memory); and its sha256."""
    digest = hashlib.sha256()
    expected, ordered = 0, True
    with open(path, "rb") as fh:
        for raw in fh:
            digest.update(raw)
            row_id = json.loads(raw)["id"]
            ordered = ordered and row_id == f"q{expected:08d}"
            expected += 1
    return {"rows": expected, "ok": ordered and expected == total, "sha256": digest.hexdigest()}


def run_mode(folder: Path, src: Path, args: argparse.Namespace, follow: bool) -> dict[str, Any]:
    server = RedisServer(folder / ("redis-follow" if follow else "redis-plain"), appendonly=False)
    server.start()
    try:
        env = {**os.environ, "GENQ_BROKER_URL": server.url, "GENQ_LOG_FORMAT": "json"}
        base = int(server.client().info("memory")["used_memory"])
        sampler = MemorySampler(server)
        sampler.start()
        _, _, stdout = run_child(["submit", str(src), "--profile", "tiny-random"], env, folder)
        job_id = stdout.strip().splitlines()[-1]
        out = folder / ("follow.jsonl" if follow else "plain.jsonl")
        collector = None
        if follow:
            log = open(folder / "follow.err", "w")  # noqa: SIM115 - closed below
            collector = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "collect", job_id, "-o", str(out), "--follow"],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        started = time.monotonic()
        # nothing drains the plain job: how fast it is written changes nothing but the wait
        rate = args.rate if follow else float("inf")
        feed(server.url, job_id, args.items, rate=rate, answer_bytes=args.answer_bytes)
        fed = time.monotonic() - started
        if collector is not None:
            _, status, usage = os.wait4(collector.pid, 0)
            log.close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"collect --follow failed: {(folder / 'follow.err').read_text()[-2000:]}")
            seconds, rss = time.monotonic() - started, usage.ru_maxrss / 1024
        else:
            seconds, rss, _ = run_child(["collect", job_id, "-o", str(out)], env, folder)
        peak = sampler.finish()
        return {
            "redis_peak_mb": round(peak / 1e6, 1),
            "redis_base_mb": round(base / 1e6, 1),
            "collector_peak_rss_mb": round(rss, 1),
            "collector_seconds": round(seconds, 1),
            "feed_seconds": round(fed, 1),
            "output": check_output(out, args.items),
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=2_000, help="items per second the fleet writes")
    parser.add_argument("--answer-bytes", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="genq-bench-drain-") as tmp:
        folder = Path(tmp)
        src = folder / "prompts.jsonl"
        write_input(src, args.items)
        follow = run_mode(folder, src, args, follow=True)
        plain = run_mode(folder, src, args, follow=False)
    result: dict[str, Any] = {
        "bench": "drain",
        "items": args.items,
        "rate": args.rate,
        "answer_bytes": args.answer_bytes,
        "redis_peak_mb_follow": follow["redis_peak_mb"],
        "redis_peak_mb_plain": plain["redis_peak_mb"],
        "follow_vs_plain": round(follow["redis_peak_mb"] / max(plain["redis_peak_mb"], 1e-9), 3),
        "collector_peak_rss_mb": follow["collector_peak_rss_mb"],
        "plain_collect_peak_rss_mb": plain["collector_peak_rss_mb"],
        "follow_seconds": follow["collector_seconds"],
        "plain_collect_seconds": plain["collector_seconds"],
        "feed_seconds": follow["feed_seconds"],
        "redis_base_mb": follow["redis_base_mb"],
        "output_ok": follow["output"]["ok"] and plain["output"]["ok"],
        "outputs_identical": follow["output"]["sha256"] == plain["output"]["sha256"],
        "machine": machine(),
    }
    table(
        "genq collect --follow vs at the end",
        [
            ["items", "Redis peak MB follow", "Redis peak MB plain", "ratio", "collector MB", "same"],
            [
                str(result[k])
                for k in (
                    "items",
                    "redis_peak_mb_follow",
                    "redis_peak_mb_plain",
                    "follow_vs_plain",
                    "collector_peak_rss_mb",
                    "outputs_identical",
                )
            ],
        ],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
