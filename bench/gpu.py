"""GPU throughput in NF4: the genq engine at several batch sizes against one-at-a-time ``generate``.

    python -m bench.gpu [--json] [--batches 1,8,32,64] [--new-tokens 64] [--naive-items 4] [--tiny]

The model has Qwen2.5-7B-Instruct's shapes with random weights (7.6B parameters, bf16 on disk, about
15 GB, built locally on first use by ``worker/model/tiny.py``; the weights do not matter for speed) plus
a rank-16 LoRA adapter, loaded exactly as a GPU worker loads the real one: ``load_model(profile,
"nf4")`` — bitsandbytes NF4 with double quantisation, ``device_map="auto"``, adapter unmerged.

* **naive**: ``model.generate`` one prompt at a time (greedy, EOS ignored);
* **engine at batch B**: ``Engine(max_batch_size=B).generate`` on B prompts, for each B of
  ``--batches`` — output tokens per second and the peak GPU memory of that run;
* **padded at batch B**: HF ``generate`` on the same B prompts, left-padded (sorted by length), on
  the same loaded model: ``vs_padded`` = engine ÷ padded at each B.

Also reported: the weights' memory as loaded (bytes of the quantised model) and the GPU memory
allocated right after loading.  ``--tiny`` runs the same steps on the tiny model (on the CPU
through bitsandbytes' CPU backend when there is no GPU): a smoke test, not a figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import run_engine
from bench.fixtures import bench_home, emit, machine, mixed_prompts, table
from bench.hf import run_naive, run_padded, spread


def gpu_profile_yaml(folder: Path, *, tiny: bool, home: Path) -> Path:
    """Build (once) the 7B-shaped model, or the tiny one, and write an NF4 profile for it."""
    from worker.model.tiny import QWEN25_7B_SHAPE, TINY, ensure_model

    spec = TINY if tiny else QWEN25_7B_SHAPE
    print(f"[gpu] building/reusing the {'tiny' if tiny else '7B-shaped'} model ...", flush=True)
    started = time.perf_counter()
    built = ensure_model(spec, home=home)
    print(f"[gpu] model ready in {time.perf_counter() - started:.0f} s: {built.base}", flush=True)
    path = folder / "bench-gpu.yaml"
    path.write_text(
        "# benchmark profile written by bench/gpu.py\nname: bench-7b-shape\n"
        f"base: {built.base}\nadapter: {built.adapter}\n"
        "generation:\n  max_new_tokens: 64\n  temperature: 0.0\n"
        f"limits:\n  max_new_tokens: 1024\n  context_length: {spec.max_position_embeddings}\n"
        "engine:\n  max_batch_size: 64\n  max_batch_tokens: 1048576\n"
        "nf4:\n  compute_dtype: auto\n  kv_cache_headroom: 0.2\n"
    )
    return path


def cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_peak() -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    ap.add_argument("--batches", default="1,8,32,64", help="Engine batch sizes, comma-separated.")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-items", type=int, default=4, help="Prompts for the one-at-a-time run.")
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})

    from worker.core.profiles import load_profile
    from worker.engine import Engine
    from worker.model.loading import load_model

    home = bench_home()
    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(gpu_profile_yaml(Path(tmp), tiny=args.tiny, home=home))
        loaded = load_model(profile, "nf4")
    info = machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    print(f"[gpu] {device}; loaded in {loaded.load_seconds:.0f} s, placement {loaded.placement}", flush=True)
    items = mixed_prompts(Path(), max(batches), args.new_tokens)

    naive_items = spread(items, args.naive_items)
    run_naive(loaded, naive_items[:1], 4)  # warm-up
    naive_s, naive_tokens = run_naive(loaded, naive_items, args.new_tokens)
    naive_tps = naive_tokens / naive_s

    runs: dict[int, dict[str, Any]] = {}
    for b in batches:
        engine = Engine(loaded, max_batch_size=b, worker="bench", ignore_eos=True)
        engine.generate(items[:2])  # warm-up
        cuda_peak_reset()
        print(f"[gpu] engine at batch {b} ...", flush=True)
        seconds, tokens = run_engine(engine, items[:b])
        padded_s, padded_tokens = (
            run_padded(loaded, items[:b], args.new_tokens, b) if b > 1 else (seconds, tokens)
        )
        runs[b] = {
            "padded_tok_s": round(padded_tokens / padded_s, 2),
            "vs_padded": round(tokens / seconds / (padded_tokens / padded_s), 2),
            "tok_s": round(tokens / seconds, 2),
            "seconds": round(seconds, 3),
            "tokens": tokens,
            "peak_gpu_bytes": cuda_peak(),
            "x_naive": round(tokens / seconds / naive_tps, 2),
        }
    result: dict[str, Any] = {
        "benchmark": "gpu",
        **info,
        "device": device,
        "model": "tiny-random" if args.tiny else "qwen2.5-7b-shape",
        "mode": loaded.mode,
        "placement": loaded.placement,
        "quantized_linear_layers": loaded.quantized_linear_layers,
        "weights_bytes": loaded.weights_bytes,
        "gpu_allocated_after_load_bytes": loaded.extra.get("cuda_allocated_bytes"),
        "new_tokens": args.new_tokens,
        "naive_items": len(naive_items),
        "naive_tok_s": round(naive_tps, 2),
        "engine": {str(b): r for b, r in runs.items()},
        "speedup_at_largest_batch": runs[max(batches)]["x_naive"],
        "vs_padded_at_largest_batch": runs[max(batches)]["vs_padded"],
    }
    rows = [("run", "prompts", "tokens", "seconds", "tok/s", "× naive", "peak GPU memory / × padded")]
    rows.append(
        ("naive HF generate", str(len(naive_items)), str(naive_tokens), f"{naive_s:.1f}", f"{naive_tps:.1f}",
         "1.0", "-")
    )  # fmt: skip
    for b, r in runs.items():
        rows.append(
            (f"genq engine, batch {b}", str(b), str(r["tokens"]), f"{r['seconds']:.2f}", f"{r['tok_s']:.1f}",
             f"{r['x_naive']:.1f}", gib(r["peak_gpu_bytes"]))
        )  # fmt: skip
        rows.append(
            (f"HF generate, padded batch {b}", str(b), "-", "-", f"{r['padded_tok_s']:.1f}",
             f"{r['padded_tok_s'] / naive_tps:.1f}", f"engine {r['vs_padded']:.2f}x")
        )  # fmt: skip
    table(f"GPU benchmark: {result['model']} in {loaded.mode} on {device}", rows)
    print(f"weights as loaded: {gib(loaded.weights_bytes)}; placement {loaded.placement}", flush=True)
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
