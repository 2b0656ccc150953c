"""Engine throughput: genq's engine against the Hugging Face baselines a user would try, with this
machine's best fp32 kernel measured in the same run.

    python -m bench.engine [--json] [--items 64] [--new-tokens 64] [--naive-items 16]
                           [--padded 32,64] [--mixed-mean 32] [--skip-generate-batch] [--repeat N]
                           [--hf-pass] [--padded-prefill] [--tiny]

All runs share one model — the ~200M-parameter Qwen2-shaped benchmark model (random weights, fp32,
LoRA adapter merged: the CPU worker's mode), built locally on first use and set up exactly as a
worker sets it up (``build_engine``: threads, packed weights, autotuned batch size) — the same
prompts (mixed lengths, fixed seed) and greedy decoding with EOS ignored, so every run generates
exactly ``new-tokens`` per prompt:

* **engine**: ``Engine.generate`` on all prompts (the batch size measured first, outside the timing);
  with ``--hf-pass`` also the same engine through transformers' forward pass instead of its own
  Llama-family pass (:mod:`worker.engine.llama`), interleaved: ``…_hf_pass`` figures; with
  ``--padded-prefill`` the engine with its prefill rows left-padded side by side instead of packed
  end to end: ``…_padded_prefill`` figures (``packed_prefill_gain``);
* **padded**: HF ``generate`` on left-padded batches of 32 and 64 prompts (:func:`bench.hf.run_padded`),
  on the engine's packed weights (the same kernels) and on plain ``nn.Linear`` (what transformers
  alone runs);
* **naive**: HF ``generate`` one prompt at a time (``--naive-items`` prompts spread over the length
  range: its rate is per token and hardly depends on the batch it is taken from);
* **generate_batch**: transformers' continuous batching, where it runs (``--skip-generate-batch``);
* **mixed lengths**: the same prompts, each with an answer length of its own drawn (fixed seed) from
  the long-tailed shape of real chat answers (:func:`bench.fixtures.answer_lengths`: log-normal,
  standard deviation = mean, mean ``--mixed-mean``), EOS ignored so each ends exactly there: the
  engine, and the padded baselines with each row stopped at its length and each batch run until its
  last row ends, as ``generate`` does (``--mixed-mean 0``: not run).

Headline ratios: ``vs_padded`` = engine ÷ the best padded run (of all of them), ``vs_padded_plain``
= engine ÷ the best padded run on plain ``nn.Linear``, ``speedup`` = engine ÷ naive,
``vs_padded_mixed`` = the engine ÷ the best padded run on the mixed lengths; ``useful_fraction``
(and ``useful_fraction_mixed``) = tokens kept ÷ row-steps computed, per run.
``roofline_fraction`` = the FLOPs the workload needs (prefill, decode, attention, vocabulary
projection: :func:`bench.flops.needed_flops`) ÷ engine seconds ÷ the best kernel measured here
(:func:`bench.flops.kernel_peak`): its ceiling is 1.  ``engine_split_seconds``: the fastest engine
run's seconds in prefill passes and in decode steps.  With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.fixtures import (
    answer_lengths,
    bench_home,
    bench_profile_yaml,
    emit,
    machine,
    mixed_prompts,
    table,
    with_lengths,
)
from bench.flops import Shape, kernel_peak, needed_flops, non_embedding_parameters
from bench.hf import plain_linears, run_generate_batch, run_naive, run_padded_counted, spread

__all__ = ["main", "non_embedding_parameters", "run_engine", "spread"]


def run_engine(engine: Any, items: list[Any]) -> tuple[float, int]:
    seconds, tokens, _ = run_engine_counted(engine, items)
    return seconds, tokens


def run_engine_counted(engine: Any, items: list[Any]) -> tuple[float, int, int]:
    """(seconds, tokens kept, row-steps computed) of ``engine.generate(items)``."""
    return run_engine_split(engine, items)[0]


def run_engine_split(engine: Any, items: list[Any]) -> tuple[tuple[float, int, int], dict[str, float]]:
    """:func:`run_engine_counted`, and the run's seconds in prefill passes and decode steps."""
    before = engine.slots.row_steps
    split = dict(engine.slots.seconds)
    started = time.perf_counter()
    results = engine.generate(items)
    seconds = time.perf_counter() - started
    parts = {k: round(engine.slots.seconds[k] - split[k], 2) for k in split}
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise SystemExit(f"engine errors: {bad[0].error}")
    return (seconds, sum(r.usage.completion_tokens for r in results), engine.slots.row_steps - before), parts


GAINS = {"hf_pass": "own_pass", "padded_prefill": "packed_prefill"}
"""A variant's name (``engine_…``) → what ``…_gain`` (the engine's rate ÷ the variant's) measures."""
LABELS = {
    "engine_hf_pass": "transformers' forward pass",
    "engine_padded_prefill": "prefill left-padded",
}


@contextmanager
def _forward_set(forward: Any, changes: dict[str, Any]) -> Iterator[None]:
    """``forward``'s attributes set to ``changes`` for the duration."""
    saved = {k: getattr(forward, k) for k in changes}
    for k, v in changes.items():
        setattr(forward, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(forward, k, v)


Run = tuple[float, int, int]
"""(seconds, tokens kept, row-steps computed)."""


def _useful(run: Run) -> float | None:
    return round(run[1] / run[2], 3) if run[2] else None


def _compare(engine_run: Run, padded: dict[str, Run]) -> tuple[float | None, float | None]:
    """The engine's rate ÷ the best padded run's, overall and on plain nn.Linear."""
    rate = {name: t / s for name, (s, t, _) in padded.items()}
    tps = engine_run[1] / engine_run[0]
    best = max(rate.values(), default=None)
    plain = max((v for k, v in rate.items() if k.startswith("plain")), default=None)
    return (round(tps / best, 2) if best else None), (round(tps / plain, 2) if plain else None)


def _row(name: str, prompts: int, tokens: int, seconds: float, naive_tps: float) -> tuple[str, ...]:
    tps = tokens / seconds
    return (name, str(prompts), str(tokens), f"{seconds:.1f}", f"{tps:.1f}", f"{tps / naive_tps:.1f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--naive-items", type=int, default=16, help="Prompts for the one-at-a-time run.")
    ap.add_argument("--padded", default="32,64", help="Batch sizes of the padded HF baseline ('' for none).")
    ap.add_argument(
        "--padded-plain",
        default="32,64",
        help="The same on plain nn.Linear layers, as transformers runs them.",
    )
    ap.add_argument(
        "--mixed-mean",
        type=float,
        default=32,
        help="Mean answer length of the mixed-length workload (0: not run).",
    )
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Run the engine and the padded baselines this many times, interleaved, then the naive "
        "run as many times, and keep each one's fastest run (shared machines: the least disturbed "
        "run is the closest to the truth).",
    )
    ap.add_argument(
        "--hf-pass",
        action="store_true",
        help="Also run the engine through transformers' forward pass (its own pass off), interleaved.",
    )
    ap.add_argument(
        "--padded-prefill",
        action="store_true",
        help="Also run the engine with its prefill passes left-padded (not packed), interleaved.",
    )
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)
    padded_sizes = sorted({int(b) for b in args.padded.split(",") if b.strip()})
    plain_sizes = sorted({int(b) for b in args.padded_plain.split(",") if b.strip()})

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

    print("[bench] measuring the best fp32 kernel (torch.mm and oneDNN packed) ...", flush=True)
    peak = kernel_peak(loaded.model)

    tuned = engine.max_batch_size
    engine.generate(items[:2])  # warm-up
    lengths = answer_lengths(len(items), args.mixed_mean) if args.mixed_mean > 0 else []
    mixed_items = with_lengths(items, lengths) if lengths else []
    workloads = [("", items, args.new_tokens)]
    if mixed_items:
        workloads.append(("mixed ", mixed_items, args.new_tokens))
    runs: dict[str, list[Run]] = {}
    splits: dict[tuple[str, Run], dict[str, float]] = {}
    own = engine.forward.own
    variants: list[tuple[str, dict[str, Any]]] = [("engine", {})]
    if args.hf_pass and own is not None:
        variants.append(("engine_hf_pass", {"own": None}))
    if args.padded_prefill and engine.forward.packs:
        variants.append(("engine_padded_prefill", {"pack_prefill": False}))
    for r in range(max(1, args.repeat)):
        for tag, work, new in workloads:
            print(f"[bench] round {r + 1}: {tag}engine, {len(work)} prompts at batch {tuned} ...", flush=True)
            for name, changes in variants:
                with _forward_set(engine.forward, changes):
                    run, parts = run_engine_split(engine, work)
                runs.setdefault(f"{tag}{name}", []).append(run)
                splits[(f"{tag}{name}", run)] = parts
            for b in padded_sizes:
                runs.setdefault(f"{tag}padded{b}", []).append(run_padded_counted(loaded, work, new, b))
            with plain_linears(loaded.model):
                for b in plain_sizes:
                    runs.setdefault(f"{tag}plain{b}", []).append(run_padded_counted(loaded, work, new, b))
    best = {name: min(times) for name, times in runs.items()}  # the fastest run of each
    engine_s, engine_tokens, _ = best["engine"]
    padded = {b: best[f"padded{b}"][:2] for b in padded_sizes}
    plain = {b: best[f"plain{b}"][:2] for b in plain_sizes}

    naive_items = spread(items, args.naive_items)
    run_naive(loaded, naive_items[:1], 4)  # warm-up
    naive_runs = [run_naive(loaded, naive_items, args.new_tokens) for _ in range(max(1, args.repeat))]
    naive_s, naive_tokens = min(naive_runs)  # the fastest, like every other run's

    batch: tuple[float, int] | str = "skipped"
    if not args.skip_generate_batch:
        print("[bench] transformers generate_batch ...", flush=True)
        batch = run_generate_batch(loaded, items, args.new_tokens)

    shape = Shape.of(loaded.model)
    prompt_lengths = [len(engine.prepare(it).ids) for it in items]
    flops = needed_flops(shape, [(p, args.new_tokens) for p in prompt_lengths])
    naive_tps = naive_tokens / naive_s
    engine_tps = engine_tokens / engine_s
    padded_tps = {b: t / s for b, (s, t) in padded.items()}
    plain_tps = {b: t / s for b, (s, t) in plain.items()}
    best_padded = max([*padded_tps.values(), *plain_tps.values()], default=None)
    best_plain = max(plain_tps.values(), default=None)
    roofline = flops / engine_s / peak["best"]
    result: dict[str, Any] = {
        "benchmark": "engine",
        **info,
        "model": profile.name,
        "non_embedding_parameters": non_embedding_parameters(loaded.model),
        "matmul_parameters": shape.params,
        "items": len(items),
        "prompt_tokens": sum(prompt_lengths),
        "new_tokens": args.new_tokens,
        "engine_tok_s": round(engine_tps, 2),
        "engine_batch_size": tuned,
        "autotune": engine.autotuned,
        "padded_tok_s": {str(b): round(t, 2) for b, t in padded_tps.items()},
        "padded_plain_tok_s": {str(b): round(t, 2) for b, t in plain_tps.items()},
        "vs_padded": round(engine_tps / best_padded, 2) if best_padded else None,
        "vs_padded_plain": round(engine_tps / best_plain, 2) if best_plain else None,
        "useful_fraction": {k: _useful(v) for k, v in best.items() if not k.startswith("mixed ")},
        "naive_items": len(naive_items),
        "naive_tok_s": round(naive_tps, 2),
        "speedup": round(engine_tps / naive_tps, 2),
        "needed_gflop": round(flops / 1e9, 1),
        "engine_gflops": round(flops / engine_s / 1e9, 1),
        "kernel_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "matmul_peak_gflops": round(peak["matmul"] / 1e9, 1),
        "roofline_fraction": round(roofline, 3),
        "engine_tokens": engine_tokens,
        "engine_seconds": round(engine_s, 2),
        "repeat": max(1, args.repeat),
        "all_seconds": {name: [round(s, 2) for s, _, _ in times] for name, times in runs.items()},
        "naive_seconds": round(naive_s, 2),
        "naive_all_seconds": [round(s, 2) for s, _ in naive_runs],
        "own_pass": own is not None,
        "engine_split_seconds": splits[("engine", best["engine"])],
    }
    for name, _ in variants[1:]:
        v_s, v_tokens, _ = best[name]
        v_tps = v_tokens / v_s
        suffix = name.removeprefix("engine_")
        result.update(
            {
                f"{name}_tok_s": round(v_tps, 2),
                f"{GAINS[suffix]}_gain": round(engine_tps / v_tps, 3),
                f"vs_padded_{suffix}": round(v_tps / best_padded, 2) if best_padded else None,
                f"roofline_fraction_{suffix}": round(flops / v_s / peak["best"], 3),
                f"{name}_split_seconds": splits[(name, best[name])],
            }
        )
    if mixed_items:
        mixed = {k.removeprefix("mixed "): v for k, v in best.items() if k.startswith("mixed ")}
        baselines = {k: v for k, v in mixed.items() if not k.startswith("engine")}
        vs_mixed, vs_mixed_plain = _compare(mixed["engine"], baselines)
        for name, _ in variants[1:]:
            result[f"vs_padded_mixed_{name.removeprefix('engine_')}"] = _compare(mixed[name], baselines)[0]
        result.update(
            {
                "vs_padded_mixed": vs_mixed,
                "vs_padded_mixed_plain": vs_mixed_plain,
                "useful_fraction_mixed": {k: _useful(v) for k, v in mixed.items()},
                "mixed_tok_s": {k: round(t / s, 2) for k, (s, t, _) in mixed.items()},
                "mixed_tokens": sum(lengths),
                "mixed_tokens_kept": {k: t for k, (_, t, _) in mixed.items()},
                "mixed_answer_lengths": {
                    "mean": round(sum(lengths) / len(lengths), 1),
                    "median": sorted(lengths)[len(lengths) // 2],
                    "max": max(lengths),
                    "min": min(lengths),
                    "mean_asked": args.mixed_mean,
                },
            }
        )
    rows: list[tuple[str, ...]] = [("run", "prompts", "tokens", "seconds", "tok/s", "× naive")]
    rows.append(_row("naive HF generate, batch 1", len(naive_items), naive_tokens, naive_s, naive_tps))
    for b, (s, t) in padded.items():
        rows.append(_row(f"HF generate, left-padded batches of {b}", len(items), t, s, naive_tps))
    for b, (s, t) in plain.items():
        rows.append(_row(f"the same, plain nn.Linear, batches of {b}", len(items), t, s, naive_tps))
    rows.append(_row(f"genq engine (batch {tuned})", len(items), engine_tokens, engine_s, naive_tps))
    for name, _ in variants[1:]:
        v_s, v_tokens, _ = best[name]
        rows.append(_row(f"the same, {LABELS[name]}", len(items), v_tokens, v_s, naive_tps))
    if isinstance(batch, tuple):
        batch_s, batch_tokens = batch
        result["generate_batch_tok_s"] = round(batch_tokens / batch_s, 2)
        rows.append(_row("transformers generate_batch", len(items), batch_tokens, batch_s, naive_tps))
    else:
        result["generate_batch"] = batch
        rows.append(("transformers generate_batch", "-", "-", "-", "-", batch))
    table(f"engine benchmark: {profile.name}, {shape.params / 1e6:.0f}M non-embedding parameters", rows)
    if mixed_items:
        mixed_rows = [("run (mixed answer lengths)", "tokens", "row-steps", "useful", "seconds", "tok/s")]
        for name, (s, t, steps) in mixed.items():
            useful = f"{t / steps:.2f}" if steps else "-"
            mixed_rows.append((name, str(t), str(steps), useful, f"{s:.1f}", f"{t / s:.1f}"))
        table(
            f"mixed answer lengths: mean {result['mixed_answer_lengths']['mean']}, median "
            f"{result['mixed_answer_lengths']['median']}, max {max(lengths)} (log-normal, sd = mean)",
            mixed_rows,
        )
        print(f"vs padded on mixed lengths {result['vs_padded_mixed']}x", flush=True)
    print(
        f"vs padded {result['vs_padded']}x, vs naive {result['speedup']}x; best kernel "
        f"{peak['best'] / 1e9:.1f} GFLOP/s (mm {peak['matmul'] / 1e9:.1f}, "
        f"packed {peak['packed'] / 1e9:.1f}); "
        f"engine at {roofline:.0%} of it ({flops / 1e9:.0f} GFLOP needed, {engine_s:.1f} s)",
        flush=True,
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
