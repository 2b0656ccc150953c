"""The Hugging Face baselines the engine is measured against, on the same loaded model.

* **naive**: ``model.generate`` one prompt at a time;
* **padded**: ``model.generate`` on left-padded batches of ``B`` prompts (sorted by length first,
  which only helps it: less padding) — what a user would try before anything else.  On the model as
  the engine holds it (its linear layers prepacked for oneDNN: the same kernels), and on the plain
  ``nn.Linear`` model a user gets from transformers (:func:`plain_linears`);
* **generate_batch**: transformers' own continuous batching, where this transformers has it.

All greedy with EOS ignored (``min_new_tokens`` = the batch's longest answer), so every run
generates exactly the tokens asked for.  Items with answers of their own lengths (their
``max_new_tokens``) end each row at its length through a per-row stopping criterion, and a batch
runs until its last row ends, as ``generate`` does; the row-steps it computes are counted.
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


class RowLengths:
    """A ``generate`` stopping criterion: row ``i`` is done once it has ``lengths[i]`` new tokens.
    Counts the row-steps computed (every row of the batch, each token, done or not)."""

    def __init__(self, lengths: list[int], prompt_width: int) -> None:
        self.lengths = torch.tensor(lengths)
        self.width = prompt_width
        self.row_steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.row_steps += int(input_ids.shape[0])
        new = input_ids.shape[1] - self.width
        return (new >= self.lengths).to(input_ids.device)


def _generate(loaded: Any, prompts: list[str], lengths: list[int]) -> tuple[int, int]:
    """Greedy ``generate`` of one left-padded batch, row ``i`` ending at ``lengths[i]`` new tokens:
    (tokens kept, row-steps computed)."""
    from transformers import StoppingCriteriaList

    model, tok = loaded.model, loaded.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    width = int(enc["input_ids"].shape[1])
    rows = RowLengths(lengths, width)
    out = model.generate(
        **enc,
        max_new_tokens=max(lengths),
        min_new_tokens=max(lengths),
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        stopping_criteria=StoppingCriteriaList([rows]),
    )
    generated = out.shape[1] - width
    return sum(min(n, generated) for n in lengths), rows.row_steps


def answer_length(item: Any, default: int) -> int:
    """The item's own ``max_new_tokens``, else ``default``."""
    own = getattr(getattr(item, "params", None), "max_new_tokens", None)
    return int(own) if own else default


def run_naive(loaded: Any, items: list[Any], new_tokens: int) -> tuple[float, int]:
    """One prompt at a time through ``model.generate``."""
    total, started = 0, time.perf_counter()
    with torch.inference_mode():
        for n, item in enumerate(items, 1):
            total += _generate(loaded, [item.prompt], [answer_length(item, new_tokens)])[0]
            print(f"[bench] naive {n}/{len(items)}", flush=True)
    return time.perf_counter() - started, total


def run_padded(loaded: Any, items: list[Any], new_tokens: int, batch: int) -> tuple[float, int]:
    """``model.generate`` on left-padded batches of ``batch`` prompts, sorted by prompt length
    (the answers' lengths are not known in advance); each row ends at its item's
    ``max_new_tokens`` (else ``new_tokens``).  (seconds, tokens kept)."""
    seconds, tokens, _ = run_padded_counted(loaded, items, new_tokens, batch)
    return seconds, tokens


def run_padded_counted(loaded: Any, items: list[Any], new_tokens: int, batch: int) -> tuple[float, int, int]:
    """:func:`run_padded`, with the row-steps computed: (seconds, tokens kept, row-steps)."""
    tok = loaded.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    ordered = sorted(items, key=lambda it: len(tok(it.prompt)["input_ids"]))
    total = steps = 0
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for s in range(0, len(ordered), batch):
                group = ordered[s : s + batch]
                kept, computed = _generate(
                    loaded, [it.prompt for it in group], [answer_length(it, new_tokens) for it in group]
                )
                total += kept
                steps += computed
                print(
                    f"[bench] padded batch {batch}: {min(s + batch, len(ordered))}/{len(ordered)}", flush=True
                )
    finally:
        tok.padding_side = side
    return time.perf_counter() - started, total, steps


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
