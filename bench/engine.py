"""Engine throughput: genq's engine against one-at-a-time HF ``generate`` and transformers'
continuous batching, with this machine's fp32 matmul peak measured in the same run.

    python -m bench.engine [--json] [--items 64] [--new-tokens 64] [--naive-items 16] [--tiny]

All runs share one model — the ~200M-parameter Qwen2-shaped benchmark model (random weights, fp32,
LoRA adapter merged: the CPU worker's mode), built locally on first use — the same prompts (mixed
lengths, fixed seed) and greedy decoding with EOS ignored, so every run generates exactly
``new-tokens`` per prompt:

* **naive**: ``model.generate`` one prompt at a time (``--naive-items`` prompts spread over the
  length range: its rate is per token and hardly depends on the batch it is taken from);
* **engine**: ``Engine.generate`` on all prompts, with the profile's defaults (``max_batch_size:
  auto``: the batch size is measured by :meth:`Engine.autotune` first, outside the timing);
* **generate_batch**: transformers' continuous batching on all prompts, where this transformers
  has it and it runs on this device (``--skip-generate-batch`` to leave it out);
* **matmul peak**: the best fp32 GFLOP/s of ``torch.mm`` over a few large shapes, same threads.

``roofline_fraction`` = 2 × non-embedding parameters × generated tokens ÷ engine seconds ÷ peak
FLOP/s: how close the engine gets to what the arithmetic units can do.  With ``--json`` the last
line is one JSON object (``naive_tok_s``, ``engine_tok_s``, ``speedup``, ``roofline_fraction``, ...).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table

MATMUL_SHAPES = ((2048, 2048, 2048), (1024, 4096, 4096), (512, 1024, 2816), (256, 2816, 1024))


def matmul_peak(seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of ``torch.mm`` over :data:`MATMUL_SHAPES` (a few repeats each)."""
    best = 0.0
    with torch.inference_mode():
        for m, k, n in MATMUL_SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            torch.mm(a, b)  # warm-up
            runs, spent = 0, 0.0
            while spent < seconds / len(MATMUL_SHAPES) or runs < 3:
                t0 = time.perf_counter()
                torch.mm(a, b)
                dt = time.perf_counter() - t0
                spent += dt
                runs += 1
                best = max(best, 2 * m * k * n / dt)
    return best


def non_embedding_parameters(model: Any) -> int:
    """Parameters outside the token embedding and the output head (the roofline's numerator)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or "embed_tokens" in name or "lm_head" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over the prompt-length range."""
    if n >= len(items):
        return list(items)
    ordered = sorted(items, key=lambda it: len(it.prompt or ""))
    step = len(ordered) / n
    return [ordered[int(i * step + step / 2)] for i in range(n)]


def run_naive(loaded: Any, items: list[Any], new_tokens: int) -> tuple[float, int]:
    """One prompt at a time through ``model.generate`` (greedy, EOS ignored)."""
    model, tok = loaded.model, loaded.tokenizer
    total, started = 0, time.perf_counter()
    with torch.inference_mode():
        for n, item in enumerate(items, 1):
            ids = tok(item.prompt, return_tensors="pt").to(model.device)
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            total += out.shape[1] - ids["input_ids"].shape[1]
            print(f"[bench] naive {n}/{len(items)}", flush=True)
    return time.perf_counter() - started, total


def run_engine(engine: Any, items: list[Any]) -> tuple[float, int]:
    started = time.perf_counter()
    results = engine.generate(items)
    seconds = time.perf_counter() - started
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise SystemExit(f"engine errors: {bad[0].error}")
    return seconds, sum(r.usage.completion_tokens for r in results)


def run_generate_batch(loaded: Any, items: list[Any], new_tokens: int) -> tuple[float, int] | str:
    """transformers' continuous batching, or why it was not measured."""
    model, tok = loaded.model, loaded.tokenizer
    if not hasattr(model, "generate_batch"):
        return "not available in this transformers"
    from transformers import GenerationConfig

    prompts = [tok(item.prompt)["input_ids"] for item in items]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=tok.pad_token_id,
    )
    try:
        with torch.inference_mode():
            model.generate_batch(inputs=prompts[:2], generation_config=config)  # warm-up
            started = time.perf_counter()
            out = model.generate_batch(inputs=prompts, generation_config=config)
            seconds = time.perf_counter() - started
    except Exception as exc:  # it is experimental: report why instead of failing the benchmark
        return f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    return seconds, sum(len(o.generated_tokens) for o in out.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-items", type=int, default=16, help="Prompts for the one-at-a-time run.")
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model

    home = bench_home()
    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=home))
        loaded = load_model(profile, "fp32")
    items = mixed_prompts(Path(), args.items, args.new_tokens)
    engine = build_engine(loaded, worker="bench", ignore_eos=True)  # threads, packed weights, batch size
    info = machine()
    print(f"[bench] {info['cpu']}, {info['threads']} threads, torch {info['torch']}", flush=True)

    print("[bench] measuring the fp32 matmul peak ...", flush=True)
    peak = matmul_peak()

    tuned = engine.max_batch_size
    engine.generate(items[:2])  # warm-up
    print(f"[bench] engine: {len(items)} prompts at batch {tuned} ...", flush=True)
    engine_s, engine_tokens = run_engine(engine, items)

    naive_items = spread(items, args.naive_items)
    run_naive(loaded, naive_items[:1], 4)  # warm-up
    naive_s, naive_tokens = run_naive(loaded, naive_items, args.new_tokens)

    batch: tuple[float, int] | str = "skipped"
    if not args.skip_generate_batch:
        print("[bench] transformers generate_batch ...", flush=True)
        batch = run_generate_batch(loaded, items, args.new_tokens)

    params = non_embedding_parameters(loaded.model)
    naive_tps = naive_tokens / naive_s
    engine_tps = engine_tokens / engine_s
    roofline = 2 * params * engine_tokens / engine_s / peak
    result: dict[str, Any] = {
        "benchmark": "engine",
        **info,
        "model": profile.name,
        "non_embedding_parameters": params,
        "items": len(items),
        "new_tokens": args.new_tokens,
        "naive_items": len(naive_items),
        "naive_tok_s": round(naive_tps, 2),
        "engine_tok_s": round(engine_tps, 2),
        "engine_batch_size": tuned,
        "autotune": engine.autotuned,
        "speedup": round(engine_tps / naive_tps, 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "roofline_fraction": round(roofline, 3),
        "engine_tokens": engine_tokens,
        "engine_seconds": round(engine_s, 2),
        "naive_seconds": round(naive_s, 2),
    }
    rows = [
        ("run", "prompts", "tokens", "seconds", "tok/s", "× naive"),
        ("naive HF generate, batch 1", str(len(naive_items)), str(naive_tokens), f"{naive_s:.1f}",
         f"{naive_tps:.1f}", "1.0"),
        (f"genq engine (batch {tuned})", str(len(items)), str(engine_tokens), f"{engine_s:.1f}",
         f"{engine_tps:.1f}", f"{engine_tps / naive_tps:.1f}"),
    ]  # fmt: skip
    if isinstance(batch, tuple):
        batch_s, batch_tokens = batch
        result["generate_batch_tok_s"] = round(batch_tokens / batch_s, 2)
        rows.append(
            ("transformers generate_batch", str(len(items)), str(batch_tokens), f"{batch_s:.1f}",
             f"{batch_tokens / batch_s:.1f}", f"{batch_tokens / batch_s / naive_tps:.1f}")
        )  # fmt: skip
    else:
        result["generate_batch"] = batch
        rows.append(("transformers generate_batch", "-", "-", "-", "-", batch))
    table(f"engine benchmark: {profile.name}, {params / 1e6:.0f}M non-embedding parameters", rows)
    print(
        f"matmul peak {peak / 1e9:.1f} GFLOP/s; engine at {roofline:.0%} of it "
        f"(2 × {params / 1e6:.0f}M × {engine_tokens} tokens in {engine_s:.1f} s)",
        flush=True,
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
