"""The cost of JSON-constrained decoding per token, at batch 64 on bench.engine's model.

    python -m bench.structured [--json] [--items 64] [--new-tokens 64] [--batch 64] [--tiny]

The same prompts (bench.engine's mixed prompts, greedy, EOS ignored) run three ways in one
process, on the ~200M-parameter benchmark model in fp32 (the CPU worker's mode):

* **plain**: no ``response_format``;
* **one schema**: every row constrained by the same JSON schema (compiled once);
* **per-row schemas**: every row with a schema of its own (``--batch`` distinct schemas: the
  property names differ), all rows in one batch.

The schemas hold an enum, a number and an array of short strings with a ``minItems`` no answer
reaches within ``--new-tokens``, so every row, constrained or not, generates exactly
``--new-tokens`` tokens and the figures compare the cost of a token, nothing else.  A schema is
compiled the first time a row needs it (inside the timing; about a millisecond each).

``overhead`` = 1 − constrained tok/s ÷ plain tok/s (the target: at most 0.10); on a shared
machine it moves with whatever else runs between the runs, so ``constraint_share`` also gives
the seconds spent inside the constraint (computing and applying masks, advancing matchers) as
a share of each constrained run, measured around those calls.  With ``--json`` the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table


def schema(tag: str) -> dict[str, Any]:
    """An object no answer completes within the benchmark's token budget (``minItems``)."""
    return {
        "type": "object",
        "properties": {
            f"{tag}kind": {"enum": ["drug", "dose", "symptom", "history"]},
            f"{tag}score": {"type": "number", "minimum": 0, "maximum": 100},
            f"{tag}notes": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1000,
            },
        },
        "required": [f"{tag}kind", f"{tag}score", f"{tag}notes"],
        "additionalProperties": False,
    }


def with_formats(items: list[Any], tags: list[str]) -> list[Any]:
    from worker.core.structured import ResponseFormat

    out = []
    for i, item in enumerate(items):
        tag = tags[i % len(tags)]
        fmt = ResponseFormat.model_validate(
            {"type": "json_schema", "json_schema": {"name": f"s{tag or 'x'}", "schema": schema(tag)}}
        )
        out.append(
            item.model_copy(update={"params": item.params.model_copy(update={"response_format": fmt})})
        )
    return out


def timed(engine: Any, items: list[Any]) -> tuple[float, int, float]:
    """Seconds, tokens, and the seconds of those spent in the constraint (masks, matchers)."""
    constraints = engine.rules.shaper.constraints
    before = constraints.seconds
    started = time.perf_counter()
    results = engine.generate(items)
    seconds = time.perf_counter() - started
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise SystemExit(f"engine errors: {bad[0].error}")
    return seconds, sum(r.usage.completion_tokens for r in results), constraints.seconds - before


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="Rows decoded together (and distinct schemas).")
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    args = ap.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=bench_home()))
        loaded = load_model(profile, "fp32")
    engine = build_engine(loaded, worker="bench", ignore_eos=True, max_batch_size=args.batch)
    info = machine()
    print(f"[bench] {info['cpu']}, {info['threads']} threads, torch {info['torch']}", flush=True)
    plain = mixed_prompts(Path(), args.items, args.new_tokens)
    one = with_formats(plain, ["one_"])
    per_row = with_formats(plain, [f"r{r}_" for r in range(args.batch)])
    engine.generate(with_formats(plain[:2], ["warm_"]))  # warm-up: the vocabulary's tables
    runs: dict[str, tuple[float, int, float]] = {}
    for name, items in (("plain", plain), ("one schema", one), ("per-row schemas", per_row)):
        print(f"[bench] {name}: {len(items)} prompts at batch {args.batch} ...", flush=True)
        runs[name] = timed(engine, items)
    base = runs["plain"][1] / runs["plain"][0]
    rows = [["run", "prompts", "tokens", "seconds", "tok/s", "overhead", "in the constraint"]]
    for name, (seconds, tokens, inside) in runs.items():
        tps = tokens / seconds
        share = f"{inside:.2f} s ({inside / seconds:.1%})"
        rows.append(
            [
                name,
                str(args.items),
                str(tokens),
                f"{seconds:.1f}",
                f"{tps:.1f}",
                f"{1 - tps / base:.1%}",
                share,
            ]
        )
    table(f"constrained decoding, batch {args.batch}, {args.new_tokens} new tokens per row", rows)
    constraints = engine.rules.shaper.constraints  # type: ignore[union-attr]
    result = {
        "machine": info,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "model": "tiny" if args.tiny else "bench-200m",
        "items": args.items,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "schemas_compiled": constraints.compiles,
        "plain_tok_s": round(base, 2),
        "one_schema_tok_s": round(runs["one schema"][1] / runs["one schema"][0], 2),
        "per_row_tok_s": round(runs["per-row schemas"][1] / runs["per-row schemas"][0], 2),
    }
    result["one_schema_overhead"] = round(1 - result["one_schema_tok_s"] / base, 4)
    result["per_row_overhead"] = round(1 - result["per_row_tok_s"] / base, 4)
    # the time spent inside the constraint, as a share of each run: the overhead measured directly,
    # unaffected by what else the machine does between runs
    result["one_schema_constraint_share"] = round(runs["one schema"][2] / runs["one schema"][0], 4)
    result["per_row_constraint_share"] = round(runs["per-row schemas"][2] / runs["per-row schemas"][0], 4)
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
