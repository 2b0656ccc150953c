"""What the benchmarks share: the model, its profile, the prompts, the report."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.core.schema import GenParams, Item


def bench_home() -> Path:
    """Where benchmark models are built (kept between runs): ``GENQ_HOME`` or ``.genq/bench``."""
    home = Path(os.environ.get("GENQ_HOME") or Path(__file__).resolve().parent.parent / ".genq" / "bench")
    os.environ["GENQ_HOME"] = str(home)  # worker processes started by a benchmark use the same cache
    return home


def bench_profile_yaml(folder: Path, *, tiny: bool = False, home: Path | None = None) -> Path:
    """Build (once) the ~200M benchmark model, or the tiny one, and write a profile for it."""
    from worker.model.tiny import BENCH_200M, TINY, ensure_model

    spec = TINY if tiny else BENCH_200M
    print(f"[bench] building/reusing the {'tiny' if tiny else '~200M'} model ...", flush=True)
    built = ensure_model(spec, home=home)
    name = "bench-tiny" if tiny else "bench-200m"
    path = folder / f"{name}.yaml"
    path.write_text(
        f"# benchmark profile written by bench/fixtures.py\nname: {name}\nbase: {built.base}\n"
        f"adapter: {built.adapter}\ngeneration:\n  max_new_tokens: 64\n  temperature: 0.0\n"
        f"limits:\n  max_new_tokens: 1024\n  context_length: {spec.max_position_embeddings}\n"
        "engine:\n  max_batch_size: auto\n  max_batch_tokens: 1048576\n"
    )
    return path


def mixed_prompts(profile_path: Path, n: int, new_tokens: int, seed: int = 1234) -> list[Item]:
    """``n`` prompts of 8 to 96 words of medical-ish text (fixed seed), ``new_tokens`` each."""
    from worker.model.tiny import _WORDS

    rng = random.Random(seed)
    items = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 96))]
        items.append(
            Item(
                index=i,
                id=f"b{i:05d}",
                line=i + 1,
                prompt=" ".join(words),
                params=GenParams(max_new_tokens=new_tokens),
            )
        )
    return items


ANSWER_CV = 1.0
"""Coefficient of variation (standard deviation ÷ mean) of answer lengths in published chat data:
response lengths in tokens have a standard deviation about equal to their mean (Alpaca 64.5 ± 64.9,
as tabulated in ShareChat, arXiv 2512.17843, Table 1), with a long right tail; LMSYS-Chat-1M
(arXiv 2309.11998, Table 1) averages 214.5 tokens per response and 69.5 per prompt."""
ANSWER_TAIL = 8.0
"""Answers are cut at this many times the mean (the log-normal's 99.8th percentile at CV 1)."""


def answer_lengths(n: int, mean: float, seed: int = 4321) -> list[int]:
    """``n`` answer lengths (tokens, fixed seed) from a log-normal with mean ``mean`` and
    coefficient of variation :data:`ANSWER_CV` — the long-tailed shape of real chat answers, scaled
    to this machine's budget — at least 1 and at most ``ANSWER_TAIL × mean``."""
    sigma = math.sqrt(math.log(1 + ANSWER_CV**2))
    mu = math.log(mean) - sigma**2 / 2
    rng = random.Random(seed)
    top = max(1, int(ANSWER_TAIL * mean))
    return [min(top, max(1, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def with_lengths(items: Sequence[Item], lengths: Sequence[int]) -> list[Item]:
    """``items`` with each one's ``max_new_tokens`` set to its own length (EOS ignored: it ends there)."""
    return [
        it.model_copy(update={"params": it.params.model_copy(update={"max_new_tokens": n})})
        for it, n in zip(items, lengths, strict=True)
    ]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def table(title: str, rows: Sequence[Sequence[str]]) -> None:
    width = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    print(f"\n{title}")
    for r in rows:
        print("  " + "  ".join(str(v).ljust(width[c]) for c, v in enumerate(r)))
    print(flush=True)


def emit(result: dict[str, Any]) -> None:
    """The last line of a ``--json`` run: one JSON object."""
    print(json.dumps(result), flush=True)
