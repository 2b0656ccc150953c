"""Shared-prefix reuse: the same items through the engine with and without it, in one run.

    python -m bench.prefix [--json] [--items 256] [--system-tokens 400] [--question-tokens 30]
                           [--new-tokens 32] [--repeat N] [--tiny] [--mixed]

The workload a bulk job usually is: every item carries the same long system prompt (~400 tokens of
instructions, as a job's ``system_prompt``, through the chat template) and a short question of its
own (~30 tokens).  The engine runs it twice on the ~200M benchmark model, set up as a worker sets
it up (``build_engine``): without reuse (each row prefills its whole prompt) and with reuse (the
system prompt's keys and values computed once, copied into each row).  Greedy, EOS ignored, so
both runs generate exactly ``new-tokens`` per item, and the texts must be identical.

``prefix_speedup`` = tok/s with reuse ÷ tok/s without.  ``--mixed`` runs bench.engine's workload
instead (no prefix shared): there the figure is what looking for prefixes costs (about 1.0).  With
``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table
from worker.core.schema import GenParams, Item


def words(rng: random.Random, n: int) -> str:
    from worker.model.tiny import _WORDS

    return " ".join(rng.choice(_WORDS) for _ in range(n))


def sized(tokenizer: Any, rng: random.Random, tokens: int) -> str:
    """Text of about ``tokens`` tokens (grown word by word)."""
    text = words(rng, max(1, tokens // 2))
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " " + words(rng, 4)
    return text


def workload(
    tokenizer: Any, n: int, system_tokens: int, question_tokens: int, new_tokens: int, seed: int = 7
) -> tuple[str, list[Item]]:
    rng = random.Random(seed)
    system = sized(tokenizer, rng, system_tokens)
    items = [
        Item(
            index=i,
            id=f"p{i:05d}",
            line=i + 1,
            prompt=sized(tokenizer, rng, rng.randint(question_tokens * 2 // 3, question_tokens * 4 // 3)),
            params=GenParams(max_new_tokens=new_tokens),
        )
        for i in range(n)
    ]
    return system, items


def timed(engine: Any, items: list[Item], system: str | None) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    results = engine.generate(items, system_prompt=system)
    seconds = time.perf_counter() - started
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"engine errors: {bad[0].error}")
    return seconds, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="End with one JSON line of the figures.")
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--question-tokens", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="Interleaved rounds; the fastest of each is kept.")
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a smoke test, not a figure).")
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="bench.engine's workload instead (64 mixed prompts, no shared prefix, 64 new tokens): "
        "what looking for prefixes costs where there are none.",
    )
    args = ap.parse_args(argv)

    from worker.core.profiles import load_profile
    from worker.engine import build_engine
    from worker.model.loading import load_model

    home = bench_home()
    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=home))
        loaded = load_model(profile, "fp32")
    engine = build_engine(loaded, worker="bench", ignore_eos=True)
    info = machine()
    system: str | None
    if args.mixed:
        system, items = None, mixed_prompts(Path(), 64, 64)
    else:
        system, items = workload(
            loaded.tokenizer, args.items, args.system_tokens, args.question_tokens, args.new_tokens
        )
    prompts = [engine.prepare(it, system_prompt=system) for it in items]
    prompt_tokens = sum(len(p.ids) for p in prompts)
    print(
        f"[bench] {info['cpu']}, {info['threads']} threads; {len(items)} items, "
        f"{prompt_tokens} prompt tokens",
        flush=True,
    )
    engine.generate(items[:2], system_prompt=system)  # warm-up (also fills the prefix cache: cleared below)

    plain_times: list[float] = []
    reuse_times: list[float] = []
    for r in range(max(1, args.repeat)):
        engine.reuse_prefixes = False
        print(f"[bench] round {r + 1}: without reuse ...", flush=True)
        seconds, plain = timed(engine, items, system)
        plain_times.append(seconds)
        engine.reuse_prefixes = True
        engine.prefixes.clear()  # each round computes the prefix again
        print(f"[bench] round {r + 1}: with reuse ...", flush=True)
        seconds, reused = timed(engine, items, system)
        reuse_times.append(seconds)
    plain_s, reuse_s = min(plain_times), min(reuse_times)

    tokens = sum(r.usage.completion_tokens for r in reused)
    assert tokens == sum(r.usage.completion_tokens for r in plain)
    identical = [r.text for r in reused] == [r.text for r in plain]
    differing = sum(a.text != b.text for a, b in zip(reused, plain, strict=True))
    entries = engine.prefixes.entries()
    shared = entries[0].length if entries else 0
    result: dict[str, Any] = {
        "benchmark": "prefix",
        **info,
        "model": profile.name,
        "workload": "mixed" if args.mixed else "shared system prompt",
        "items": len(items),
        "prompt_tokens": prompt_tokens,
        "shared_prefix_tokens": shared,
        "prefixes_computed": engine.prefixes.misses,
        "new_tokens": 64 if args.mixed else args.new_tokens,
        "batch_size": engine.max_batch_size,
        "no_reuse_tok_s": round(tokens / plain_s, 2),
        "reuse_tok_s": round(tokens / reuse_s, 2),
        "no_reuse_seconds": round(plain_s, 2),
        "reuse_seconds": round(reuse_s, 2),
        "prefix_speedup": round(plain_s / reuse_s, 2),
        "all_seconds": {
            "no_reuse": [round(s, 2) for s in plain_times],
            "reuse": [round(s, 2) for s in reuse_times],
        },
        "identical": identical,
        "items_differing": differing,
    }
    table(
        f"prefix benchmark: {profile.name}, {len(items)} items sharing a {shared}-token prefix",
        [
            ("run", "seconds", "tok/s"),
            ("without reuse", f"{plain_s:.1f}", f"{tokens / plain_s:.1f}"),
            ("with reuse", f"{reuse_s:.1f}", f"{tokens / reuse_s:.1f}"),
        ],
    )
    print(f"prefix_speedup {result['prefix_speedup']}x; identical greedy output: {identical}", flush=True)
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
