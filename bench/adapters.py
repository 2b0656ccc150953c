"""Several adapters on one base: mixed micro-batches against grouped ones, unmerged against merged.

    python -m bench.adapters [--json] [--items 64] [--new-tokens 32] [--mode fp32|nf4]

On the tiny-random-multi profile (adapters ``a`` and ``b``), set up as a worker sets it up
(``build_engine``), greedy with EOS ignored so every run generates exactly the same tokens:

* ``mixed``: a 50/50 a/b mix, rows of both adapters in every pass (peft's per-row
  ``adapter_names``, the engine's default);
* ``grouped``: the same items, micro-batches of one adapter each (``Engine.group_adapters``);
* ``unmerged_one``: every item through ``a``, still through the per-row path of the two-adapter
  model;
* ``merged_one``: every item through a one-adapter (``a``) model: merged in fp32, what a worker of
  a one-adapter profile runs.

Each run is timed twice and the faster kept.  The tiny model (hidden size 64) measures the
per-layer overhead of the adapter routing, not the cost of the extra products on a real model.
With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import emit
from worker.core.schema import GenParams, Item

PROMPT = "the patient has a history of chest pain and shortness of breath . what is the dose of"


def timed(engine: Any, items: list[Item], new_tokens: int, repeat: int = 2) -> float:
    """Completion tokens per second of ``engine`` over ``items`` (best of ``repeat``)."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = engine.generate(items, job_params=GenParams(max_new_tokens=new_tokens))
        seconds = time.perf_counter() - t0
        tokens = sum(r.usage.completion_tokens for r in results)
        best = max(best, tokens / seconds)
    return round(best, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mode", default="fp32", choices=["fp32", "nf4"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model

    def engine(profile: Any) -> Any:
        loaded = load_model(profile, args.mode)
        return build_engine(loaded, autotune=False, max_batch_size=16, ignore_eos=True)

    def batch(adapters: list[str]) -> list[Item]:
        return [Item(index=i, id=f"q{i}", prompt=f"{PROMPT} {i}", adapter=a) for i, a in enumerate(adapters)]

    n = args.items
    multi = engine(load_profile("tiny-random-multi"))
    with tempfile.TemporaryDirectory() as folder:
        one = Path(folder) / "tiny-only-a.yaml"
        one.write_text("# a\ntiny: true\nadapters:\n  a:\n    tiny: 1\n")
        single = engine(load_profile(one))
    mix = ["a", "b"] * (n // 2)
    report: dict[str, Any] = {"mode": args.mode, "items": n, "new_tokens": args.new_tokens}
    report["mixed_tok_s"] = timed(multi, batch(mix), args.new_tokens)
    multi.group_adapters = True
    report["grouped_tok_s"] = timed(multi, batch(mix), args.new_tokens)
    multi.group_adapters = False
    report["unmerged_one_tok_s"] = timed(multi, batch(["a"] * n), args.new_tokens)
    report["merged_one_tok_s" if single.loaded.adapter == "merged" else "unmerged_single_tok_s"] = timed(
        single, batch(["a"] * n), args.new_tokens
    )
    if args.json:
        emit(report)
    else:
        for key, value in report.items():
            print(f"{key:>22}  {value}")
    return report


if __name__ == "__main__":
    main()
