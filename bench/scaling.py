"""Scaling: one job through one worker process vs two, each with one thread.

    python -m bench.scaling [--json] [--items 128] [--new-tokens 32] [--chunk-size 16]

Same items, same model (the ~200M benchmark model, fp32), a real ``redis-server`` and real
``genq-worker start`` processes with ``GENQ_THREADS=1``.  Workers pull chunks, so the faster one
simply takes more.  ``scaling`` = two-worker throughput ÷ one-worker throughput.

The chunk size is ``genq submit``'s default (16).  Much smaller chunks mean small decode batches,
whose every step streams all the weights from memory: two workers then share the memory bandwidth
and scale worse (docs/BENCHMARKS.md has both).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table
from tests.cluster import RedisServer, WorkerProcess


def run_job(
    profile_path: Path, records: list[dict[str, Any]], chunk_size: int, workers: int, folder: Path
) -> dict[str, Any]:
    from producer import Client

    server = RedisServer(folder / f"redis-{workers}")
    server.start()
    procs = [
        WorkerProcess(
            server.url,
            folder / f"w{workers}-{n}.log",
            profile=str(profile_path),
            mode="fp32",
            name=f"scale-{workers}-{n}",
            env={"GENQ_THREADS": "1"},
        )
        for n in range(workers)
    ]
    try:
        for p in procs:
            p.start(wait=False)
        for p in procs:
            p.wait_ready(600)
        client = Client(server.url)
        for n in range(workers):  # warm every worker up (first-call costs are not throughput)
            client.submit(
                [{"id": f"w{n}", "prompt": "warm up", "max_new_tokens": 2}], profile=str(profile_path)
            ).wait(timeout=300)
        started = time.perf_counter()
        job = client.submit(records, profile=str(profile_path), chunk_size=chunk_size)
        state = job.wait(timeout=3600)  # polls each second; the job's end wakes it at once
        seconds = time.perf_counter() - started
        assert state.counts.succeeded == len(records), state.as_dict()
        per_worker = {name: stats.get("items", 0) for name, stats in state.workers.items()}
        return {"seconds": seconds, "tokens": state.completion_tokens, "per_worker": per_worker}
    finally:
        for p in procs:
            p.stop()
        server.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="genq: two worker processes vs one")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16, help="genq submit's default")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny model (a quick smoke run, not a figure)"
    )
    args = parser.parse_args(argv)

    home = bench_home()
    with tempfile.TemporaryDirectory(prefix="genq-bench-scaling-") as tmp:
        folder = Path(tmp)
        profile_path = bench_profile_yaml(folder, tiny=args.tiny, home=home)
        items = mixed_prompts(profile_path, args.items, args.new_tokens)
        records = [{"id": it.id, "prompt": it.prompt, "max_new_tokens": args.new_tokens} for it in items]
        runs = {}
        for workers in (1, 2):
            print(f"[scaling] {workers} worker process(es), 1 thread each ...", flush=True)
            runs[workers] = run_job(profile_path, records, args.chunk_size, workers, folder)
            print(
                f"[scaling] {workers}: {runs[workers]['seconds']:.2f} s, "
                f"items per worker {runs[workers]['per_worker']}",
                flush=True,
            )
    tok1 = runs[1]["tokens"] / runs[1]["seconds"]
    tok2 = runs[2]["tokens"] / runs[2]["seconds"]
    result = {
        "benchmark": "scaling",
        **machine(),
        "items": len(records),
        "new_tokens": args.new_tokens,
        "chunk_size": args.chunk_size,
        "one_worker_seconds": round(runs[1]["seconds"], 3),
        "two_workers_seconds": round(runs[2]["seconds"], 3),
        "one_worker_tok_s": round(tok1, 2),
        "two_workers_tok_s": round(tok2, 2),
        "scaling": round(tok2 / tok1, 3),
        "items_per_worker": runs[2]["per_worker"],
        "model": "tiny-random" if args.tiny else "bench-200m",
    }
    table(
        "scaling (1 thread per worker process)",
        [
            ("1 worker", f"{result['one_worker_seconds']} s", f"{result['one_worker_tok_s']} tok/s"),
            ("2 workers", f"{result['two_workers_seconds']} s", f"{result['two_workers_tok_s']} tok/s"),
            ("scaling", f"{result['scaling']}x", f"items per worker {result['items_per_worker']}"),
        ],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
