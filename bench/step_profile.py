"""Where a decode step's time goes: the engine's decode step on the benchmark model, profiled.

    python -m bench.step_profile [--json] [--rows 64] [--context 200] [--spread 0] [--steps 5]
                                 [--attention span,chunks,rows] [--fused on,off] [--own on,off]
                                 [--shuffle] [--threads N]

Runs ``--steps`` decode steps of ``--rows`` rows over a slot cache holding ``--context`` tokens per
row (the model set up as a worker sets it up: ``build_engine``), times them, then profiles as many
more with ``torch.profiler`` and splits the time into linear layers, attention, cache writes,
elementwise work (norms, rotary, activations, residuals), choosing the token, and what no torch op
accounts for (Python and dispatch).

``--spread S`` gives the rows different lengths, evenly from ``context·(1−S)`` to
``context·(1+S)`` (the same mean), longest first as the engine orders them (``--shuffle``: in
random order).  Each decode attention of ``--attention`` is measured, interleaved, in one process:
``span`` (every row up to the longest row, one masked sdpa call per layer), ``chunks`` (runs of rows
of similar length, each over its own span: :mod:`worker.engine.attention`, the engine's default),
``rows`` (one call per row over exactly its keys).  ``--fused on,off`` measures each of them also
with every linear layer's own product (``…/unfused``) beside the fused sibling products
(:class:`worker.engine.cpu.FusedLinear`, the default), interleaved in the same way; ``--own on,off``
each of them also through transformers' own forward pass (``…/hf``) beside the engine's own pass
for Llama-family models (:mod:`worker.engine.llama`, the default).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
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


def row_lengths(rows: int, context: int, spread: float, *, shuffle: bool = False) -> list[int]:
    """``rows`` cached lengths evenly from ``context·(1−spread)`` to ``context·(1+spread)``,
    longest first (``shuffle``: in a fixed random order)."""
    lo, hi = context * (1 - spread), context * (1 + spread)
    out = [max(1, round(hi - (hi - lo) * i / max(1, rows - 1))) for i in range(rows)]
    if shuffle:
        random.Random(7).shuffle(out)
    return out


def fusion_switch(model: torch.nn.Module) -> Callable[[bool], None]:
    """Switches ``model``'s fused sibling products on and off (each member gets its own packed
    weight back while off; a benchmark's memory, not a worker's)."""
    from worker.engine.cpu import PackedLinear

    members = [
        (m, m.fused, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()))
        for m in model.modules()
        if isinstance(m, PackedLinear) and m.fused is not None
    ]

    def switch(on: bool) -> None:
        for m, group, own in members:
            if on:
                m.fused = group
                m.__dict__.pop("packed_weight", None)
            else:
                m.fused = None
                m.packed_weight = own

    return switch


def profiled_shares(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Shares of ``steps`` calls of ``step``'s time per part (:data:`CATEGORIES`), from
    ``torch.profiler``; what no torch op accounts for is Python and dispatch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiling

    with profiling(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        profiled = time.perf_counter() - t0
    split: dict[str, float] = {}
    for event in prof.key_averages():
        part = category(event.key)
        split[part] = split.get(part, 0.0) + event.self_cpu_time_total / 1e6
    ops = sum(split.values())
    split["outside torch ops (Python, dispatch)"] = max(0.0, profiled - ops)
    total = sum(split.values())
    return {k: round(v / total, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--spread", type=float, default=0.0, help="Row lengths context·(1±S), evenly.")
    ap.add_argument("--shuffle", action="store_true", help="Rows in random order, not longest first.")
    ap.add_argument("--attention", default="chunks", help="Decode attentions to measure: span,chunks,rows.")
    ap.add_argument(
        "--fused", default="on", help="Fused sibling products: on, off, or on,off (both, interleaved)."
    )
    ap.add_argument(
        "--own", default="on", help="The engine's own Llama-family pass: on, off, or on,off (interleaved)."
    )
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.core.settings import get_settings
    from worker.engine import build_engine
    from worker.engine.attention import live_chunks
    from worker.engine.slot_cache import SlotCache
    from worker.model.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=bench_home()))
        loaded = load_model(profile, "fp32")
    settings = get_settings().model_copy(update={"threads": args.threads})
    engine = build_engine(loaded, settings=settings, max_batch_size=args.rows)
    fwd, rows, vocab = engine.forward, args.rows, int(loaded.model.config.vocab_size)
    lengths = row_lengths(rows, args.context, args.spread, shuffle=args.shuffle)
    cache = SlotCache(rows, max(lengths) + 8)
    fusing = [f.strip() for f in args.fused.split(",") if f.strip()]
    owning = [f.strip() for f in args.own.split(",") if f.strip()]
    variants = [
        v.strip() + ("" if f == "on" else "/unfused") + ("" if o == "on" else "/hf")
        for o in owning
        for f in fusing
        for v in args.attention.split(",")
        if v.strip()
    ]
    switch = fusion_switch(loaded.model) if "off" in fusing else None
    own = fwd.own

    def step(variant: str) -> None:
        attention, *flags = variant.split("/")
        if switch is not None:
            switch("unfused" not in flags)
        fwd.own = None if "hf" in flags else own
        cache.lengths = list(lengths)
        positions, visible = cache.begin_decode(rows)
        if attention == "rows":
            cache.chunks = live_chunks(cache.lengths[:rows], overhead=0)
        fwd.live_span = attention != "span"
        logits = fwd(torch.randint(0, vocab, (rows, 1)), visible, positions, cache)
        logits.argmax(dim=-1).tolist()

    times: dict[str, list[float]] = {v: [] for v in variants}
    shares: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        step(variants[0])  # allocates the cache
        for _ in range(args.steps):  # interleaved: the machine's noise falls on every variant alike
            for v in variants:
                t0 = time.perf_counter()
                step(v)
                times[v].append(time.perf_counter() - t0)
        for v in variants:
            shares[v] = profiled_shares(lambda v=v: step(v), args.steps)  # type: ignore[misc]
    best = {v: min(t) for v, t in times.items()}
    first = variants[0]
    result: dict[str, Any] = {
        "benchmark": "step_profile",
        **machine(),
        "model": profile.name,
        "rows": rows,
        "context": args.context,
        "spread": args.spread,
        "shuffle": args.shuffle,
        "live_fraction": round(sum(lengths) / (rows * max(lengths)), 3),
        "step_ms": round(best[first] * 1000, 1),
        "tok_s": round(rows / best[first], 1),
        "shares": shares[first],
        "attention": {
            v: {"step_ms": round(best[v] * 1000, 1), "tok_s": round(rows / best[v], 1), "shares": shares[v]}
            for v in variants
        },
    }
    for v in variants:
        table(
            f"decode step, attention {v}: {rows} rows, {args.context} cached tokens each on average "
            f"(spread {args.spread}), {best[v] * 1000:.0f} ms",
            [("part", "share"), *[(k, f"{x:.1%}") for k, x in shares[v].items()]],
        )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
