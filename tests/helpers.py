"""Test helpers shared by test modules (test modules never import each other).  The local
cluster harness (real redis-server, real worker processes) is tests/cluster.py; the benchmarks
drive it too."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.cluster import (
    REPO,
    RedisServer,
    WorkerProcess,
    env_for,
    free_port,
    run_genq,
    wait_for,
    write_prompts,
)

__all__ = [
    "REPO",
    "RedisServer",
    "WorkerProcess",
    "env_for",
    "free_port",
    "genq",
    "make_job",
    "one_row_profile",
    "rows",
    "wait_for",
    "write_prompts",
]


def genq(
    redis_url: str | None, *args: str, check: bool = True, **extra: str
) -> subprocess.CompletedProcess[str]:
    """``genq ARGS`` in a subprocess against ``redis_url`` (None: embedded), extra env vars."""
    return run_genq(redis_url, *args, env=extra, check=check)


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_job(store: Any, spec: Any, items: Sequence[Any]) -> None:
    """Store a job straight through the store's submit steps (for jobs no producer would make,
    such as one naming a profile that no file on this machine describes)."""
    store.begin(spec.model_copy(update={"total": 0}))
    store.write_inputs(spec.job_id, [(it.index, it.model_dump_json()) for it in items])
    store.complete_inputs(spec)
    store.finish_submit(spec.job_id)


def one_row_profile(folder: Path, name: str = "tiny-rows1") -> Path:
    """A configs folder (for ``GENQ_CONFIGS_DIR``) holding ``name``: tiny-random decoding one row
    at a time, so that a micro-batch is 4 items and each item is written as it finishes (with
    ``GENQ_FAULT_SLOW_MS``, a chunk then lasts as long as a test needs, in steps of 4 items)."""
    configs = folder / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    text = (REPO / "configs" / "tiny-random.yaml").read_text()
    text = text.replace("name: tiny-random", f"name: {name}").replace(
        "max_batch_size: 8", "max_batch_size: 1   # one row at a time: micro-batches of 4 items"
    )
    assert f"name: {name}" in text and "max_batch_size: 1 " in text
    (configs / f"{name}.yaml").write_text(text)
    return configs


def hf_greedy(model: Any, tok: Any, prompts: Sequence[str], new_tokens: int) -> list[str]:
    """HF ``generate``'s greedy answers, one prompt at a time, exactly ``new_tokens`` each (EOS
    ignored): the reference the engine's tokens must equal."""
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").to(model.device)
            gen = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out
