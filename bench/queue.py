"""Queue overhead: the same items through the engine alone and through Redis + a worker process.

    python -m bench.queue [--json] [--items 256] [--new-tokens 32] [--chunk-size 16]

Both runs use the ~200M-parameter benchmark model (fp32, adapter merged), the same items, the same
chunking and greedy decoding, one after the other on the same cores:

* **engine**: ``Engine.generate`` chunk by chunk in this process — the compute alone;
* **queue**: ``genq run FILE -o OUT`` in a subprocess with ``GENQ_BROKER_URL`` set: it submits,
  a real ``genq-worker start`` process takes the chunks over a real ``redis-server``, and it
  writes every result to OUT in input order — what a user runs.

``overhead_fraction`` = (queue − engine) ÷ queue.  ``outside_engine_fraction`` is the same but
against the time the worker itself spent in the engine (its ``chunk_done`` events): it separates
the queue's own cost from a worker that generates slower (another load on the cores, say).
``chunk_overhead_ms_median`` is, per chunk, the Celery task's run time minus the time inside the
engine (store reads/writes, bookkeeping), read from the worker's own log.

``genq run`` reads the job's status once a second (its progress line) on the same cores as the
worker, and learns of the job's end at once: the store publishes it.  ``status_tok_s`` and
``progress_tok_s`` are what ``genq status`` and that progress line say, to compare with
``queue_tok_s``, the benchmark's own clock.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table
from tests.cluster import RedisServer, WorkerProcess, parse_events, run_genq


def run_engine_alone(profile_path: Path, items: list[Any], chunk_size: int) -> tuple[float, list[float], int]:
    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model

    engine = build_engine(load_model(load_profile(profile_path), "fp32"), worker="bench")
    engine.generate(items[: min(4, len(items))])  # warm-up, as the worker's first chunk would not count
    per_chunk: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for s in range(0, len(items), chunk_size):
        t0 = time.perf_counter()
        results = engine.generate(items[s : s + chunk_size])
        per_chunk.append(time.perf_counter() - t0)
        tokens += sum(r.usage.completion_tokens for r in results)
    return time.perf_counter() - started, per_chunk, tokens


_SUCCEEDED = re.compile(r"Task genq\.run_chunk\[(?P<id>[^\]]+)\] succeeded in (?P<s>[0-9.]+)s")


def engine_seconds_in_worker(log_text: str, job_id: str) -> float:
    """Seconds the worker spent inside the engine for ``job_id`` (its ``chunk_done`` events)."""
    return sum(float(str(e["gen_seconds"])) for e in parse_events(log_text, "chunk_done", job=job_id))


def chunk_overheads(log_text: str, job_id: str) -> list[float]:
    """Per chunk: Celery task seconds minus engine seconds, from the worker log."""
    engine = {
        f"{job_id}:{e['chunk']}": float(str(e["gen_seconds"]))
        for e in parse_events(log_text, "chunk_done", job=job_id)
    }
    return [
        float(m.group("s")) - engine[m.group("id").partition("@")[0]]  # <job>:<chunk>@<incarnation>
        for m in _SUCCEEDED.finditer(log_text)
        if m.group("id").partition("@")[0] in engine
    ]


def run_queue(profile_path: Path, items: list[Any], chunk_size: int, folder: Path) -> dict[str, Any]:
    """``genq run`` (a subprocess, as a user runs it) against a real Redis and a real worker."""
    from producer import Client

    server = RedisServer(folder / "redis")
    server.start()
    worker = WorkerProcess(
        server.url, folder / "worker.log", profile=str(profile_path), mode="fp32", name="bench-q"
    )
    try:
        worker.start(timeout=600)
        client = Client(server.url)
        # warm-up job, like the engine's warm-up
        client.submit(
            [{"id": "w", "prompt": "warm up", "max_new_tokens": 2}], profile=str(profile_path)
        ).wait(timeout=300)
        prompts, out = folder / "queue-in.jsonl", folder / "queue-out.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": it.id, "prompt": it.prompt, "max_new_tokens": it.params.max_new_tokens})
                + "\n"
                for it in items
            )
        )
        args = ["run", str(prompts), "-o", str(out), "--profile", str(profile_path)]
        started = time.perf_counter()
        proc = run_genq(server.url, *args, "--chunk-size", str(chunk_size), "--job-id", "bench-queue")
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == [it.id for it in items], "genq run lost or reordered items"
        assert all(r["status"] == "ok" for r in rows), rows[:3]
        state = client.job("bench-queue").status()
        rates = re.findall(r"([0-9.]+) tok/s", proc.stderr)  # genq run's progress lines
        log_text = worker.log_tail(50_000_000)
        return {
            "seconds": seconds,
            "worker_engine_seconds": engine_seconds_in_worker(log_text, "bench-queue"),
            "tokens": state.completion_tokens,
            "status_tok_s": state.tokens_per_second,
            "progress_tok_s": float(rates[-1]) if rates else None,
            "chunk_overheads": chunk_overheads(log_text, "bench-queue"),
        }
    finally:
        worker.stop()
        server.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="genq queue overhead vs the engine alone")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny model (a quick smoke run, not a figure)"
    )
    args = parser.parse_args(argv)

    home = bench_home()
    with tempfile.TemporaryDirectory(prefix="genq-bench-queue-") as tmp:
        folder = Path(tmp)
        profile_path = bench_profile_yaml(folder, tiny=args.tiny, home=home)
        items = mixed_prompts(profile_path, args.items, args.new_tokens)
        print(f"[queue] engine alone: {len(items)} items x {args.new_tokens} tokens ...", flush=True)
        eng_s, eng_chunks, eng_tokens = run_engine_alone(profile_path, items, args.chunk_size)
        print(f"[queue] engine alone: {eng_s:.2f} s; now through Redis + a worker process ...", flush=True)
        q = run_queue(profile_path, items, args.chunk_size, folder)
    overheads = q["chunk_overheads"]
    result = {
        "benchmark": "queue",
        **machine(),
        "items": len(items),
        "new_tokens": args.new_tokens,
        "chunk_size": args.chunk_size,
        "chunks": len(eng_chunks),
        "engine_seconds": round(eng_s, 3),
        "queue_seconds": round(q["seconds"], 3),
        "engine_tok_s": round(eng_tokens / eng_s, 2),
        "queue_tok_s": round(q["tokens"] / q["seconds"], 2),
        "status_tok_s": round(q["status_tok_s"], 2),
        "progress_tok_s": q["progress_tok_s"],
        "overhead_fraction": round((q["seconds"] - eng_s) / q["seconds"], 4),
        "worker_engine_seconds": round(q["worker_engine_seconds"], 3),
        "outside_engine_fraction": round((q["seconds"] - q["worker_engine_seconds"]) / q["seconds"], 4),
        "chunk_overhead_ms_median": round(statistics.median(overheads) * 1000, 2) if overheads else None,
        "chunk_overhead_ms_max": round(max(overheads) * 1000, 2) if overheads else None,
        "model": "tiny-random" if args.tiny else "bench-200m",
    }
    table(
        "queue overhead",
        [
            ("engine alone", f"{result['engine_seconds']} s", f"{result['engine_tok_s']} tok/s"),
            ("Redis + worker", f"{result['queue_seconds']} s", f"{result['queue_tok_s']} tok/s"),
            (
                "overhead",
                f"{result['overhead_fraction'] * 100:.2f} %",
                f"median {result['chunk_overhead_ms_median']} ms/chunk",
            ),
            ("in the worker's engine", f"{result['worker_engine_seconds']} s", ""),
            ("outside the engine", f"{result['outside_engine_fraction'] * 100:.2f} %", ""),
            ("genq status", "", f"{result['status_tok_s']} tok/s"),
            ("genq run's progress line", "", f"{result['progress_tok_s']} tok/s"),
        ],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
