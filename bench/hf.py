"""The Hugging Face baselines the engine is measured against, on the same loaded model.

* **naive**: ``model.generate`` one prompt at a time;
* **padded**: ``model.generate`` on left-padded batches of ``B`` prompts (sorted by length first,
  which only helps it: less padding) — what a user would try before anything else.  On the model as
  the engine holds it (its linear layers prepacked for oneDNN: the same kernels), and on the plain
  ``nn.Linear`` model a user gets from transformers (:func:`plain_linears`);
* **generate_batch**: transformers' own continuous batching, where this transformers has it.

All greedy with EOS ignored (``min_new_tokens`` = ``max_new_tokens``), so every run generates
exactly the tokens asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def plain_linears(model: Any) -> Iterator[int]:
    """The model with genq's packed linear layers back to plain ``nn.Linear`` (the default BLAS
    call, as transformers runs them) for the duration; yields how many were switched."""
    from worker.engine.cpu import PackedLinear

    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in packed:
        m.__class__ = torch.nn.Linear  # type: ignore[assignment]
    try:
        yield len(packed)
    finally:
        for m in packed:
            m.__class__ = PackedLinear


def spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over the prompt-length range."""
    if n >= len(items):
        return list(items)
    ordered = sorted(items, key=lambda it: len(it.prompt or ""))
    step = len(ordered) / n
    return [ordered[int(i * step + step / 2)] for i in range(n)]


def _generate(loaded: Any, prompts: list[str], new_tokens: int) -> int:
    model, tok = loaded.model, loaded.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return int(out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1]))


def run_naive(loaded: Any, items: list[Any], new_tokens: int) -> tuple[float, int]:
    """One prompt at a time through ``model.generate``."""
    total, started = 0, time.perf_counter()
    with torch.inference_mode():
        for n, item in enumerate(items, 1):
            total += _generate(loaded, [item.prompt], new_tokens)
            print(f"[bench] naive {n}/{len(items)}", flush=True)
    return time.perf_counter() - started, total


def run_padded(loaded: Any, items: list[Any], new_tokens: int, batch: int) -> tuple[float, int]:
    """``model.generate`` on left-padded batches of ``batch`` prompts, sorted by length."""
    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    ordered = sorted(items, key=lambda it: len(tok(it.prompt)["input_ids"]))
    total, started = 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for s in range(0, len(ordered), batch):
                total += _generate(loaded, [it.prompt for it in ordered[s : s + batch]], new_tokens)
                print(
                    f"[bench] padded batch {batch}: {min(s + batch, len(ordered))}/{len(ordered)}", flush=True
                )
    finally:
        tok.padding_side = side
    return time.perf_counter() - started, total


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
