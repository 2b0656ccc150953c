"""Where a decode step's time goes: the engine's decode step on the benchmark model, profiled.

    python -m bench.step_profile [--json] [--rows 64] [--context 200] [--steps 5] [--threads N]

Runs ``--steps`` decode steps of ``--rows`` rows over a slot cache holding ``--context`` tokens per
row (the model set up as a worker sets it up: ``build_engine``), times them, then profiles as many
more with ``torch.profiler`` and splits the time into linear layers, attention, cache writes,
elementwise work (norms, rotary, activations, residuals), choosing the token, and what no torch op
accounts for (Python and dispatch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, table

CATEGORIES = (
    ("linear", ("linear", "addmm", "aten::mm", "aten::bmm")),
    ("attention", ("attention",)),
    ("cache writes", ("index_put", "aten::copy_")),
    ("choosing the token", ("argmax", "topk", "softmax", "sort")),
    ("elementwise", ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
                     "aten::neg", "aten::cat", "aten::sum", "aten::div", "aten::cos", "aten::sin",
                     "aten::where", "aten::le", "aten::embedding", "aten::index_select", "aten::_to_copy")),
)  # fmt: skip


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other ops"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.core.settings import get_settings
    from worker.engine import build_engine
    from worker.engine.slot_cache import SlotCache
    from worker.model.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=bench_home()))
        loaded = load_model(profile, "fp32")
    settings = get_settings().model_copy(update={"threads": args.threads})
    engine = build_engine(loaded, settings=settings, max_batch_size=args.rows)
    fwd, rows, vocab = engine.forward, args.rows, int(loaded.model.config.vocab_size)
    cache = SlotCache(rows, args.context + 8)

    def step() -> None:
        cache.lengths = [args.context] * rows
        positions, visible = cache.begin_decode(rows)
        logits = fwd(torch.randint(0, vocab, (rows, 1)), visible, positions, cache)
        logits.argmax(dim=-1).tolist()

    with torch.inference_mode():
        step()  # allocates the cache
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiling

        with profiling(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            profiled = time.perf_counter() - t0
    split: dict[str, float] = {}
    for event in prof.key_averages():
        part = category(event.key)
        split[part] = split.get(part, 0.0) + event.self_cpu_time_total / 1e6
    ops = sum(split.values())
    split["outside torch ops (Python, dispatch)"] = max(0.0, profiled - ops)
    total = sum(split.values())
    shares = {k: round(v / total, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}
    result: dict[str, Any] = {
        "benchmark": "step_profile",
        **machine(),
        "model": profile.name,
        "rows": rows,
        "context": args.context,
        "step_ms": round(min(times) * 1000, 1),
        "tok_s": round(rows / min(times), 1),
        "shares": shares,
    }
    table(
        f"decode step: {rows} rows, {args.context} cached tokens each, {min(times) * 1000:.0f} ms",
        [("part", "share"), *[(k, f"{v:.1%}") for k, v in shares.items()]],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
