"""Choosing each row's next token and deciding when a row is done: pure functions.

Nothing here knows about the model, the batch or the engine: the choice of a token depends only on
the row's logits, its parameters and its own random generator; the end of a row only on its tokens,
its budget, the end-of-sequence ids and its stop strings.  That is what makes an item's text the
same alone or in any batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from worker.core.schema import GenParams
from worker.core.states import FinishReason

Decode = Callable[[list[int]], str]
"""Token ids to text, special tokens skipped (the tokenizer's ``decode``)."""

STOP_LOOKBACK = 8
"""Tokens decoded beyond the longest stop string's length when looking for it in a row's tail."""


def make_generator(params: GenParams) -> torch.Generator | None:
    """A row's own random generator, seeded by its ``seed`` (a random one when unset); ``None``
    for greedy rows (temperature 0 or unset)."""
    if not params.temperature:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def sample_token(logits: torch.Tensor, params: GenParams, generator: torch.Generator) -> int:
    """One token drawn from ``logits`` (one row, on any device) with temperature, top-k and top-p,
    using ``generator`` (on the CPU) so the draw depends on nothing but this row."""
    scores = logits.float().cpu() / float(params.temperature or 1.0)
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs, order = torch.sort(torch.softmax(scores, dim=-1), descending=True)
    cdf = probs.cumsum(0)
    top_p = float(params.top_p if params.top_p is not None else 1.0)
    if top_p < 1.0:
        cut = int(torch.searchsorted(cdf, torch.tensor(top_p)).item()) + 1
        probs, order, cdf = probs[:cut], order[:cut], probs[:cut].cumsum(0)
    u = torch.rand((), generator=generator) * cdf[-1]
    pick = min(int(torch.searchsorted(cdf, u.reshape(1)).item()), len(order) - 1)
    return int(order[pick])


def choose_tokens(
    logits: torch.Tensor, params: Sequence[GenParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each row of ``logits`` ([rows, vocab]): the argmax for greedy rows (no
    generator), a seeded draw (:func:`sample_token`) for the others."""
    chosen: list[int] = logits.argmax(dim=-1).tolist()
    for r, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if gen is not None:
            chosen[r] = sample_token(logits[r], p, gen)
    return chosen


def stop_reason(
    tokens: Sequence[int],
    *,
    max_new: int,
    eos: set[int] | frozenset[int],
    stops: Sequence[str] | None,
    decode: Decode,
    ignore_eos: bool = False,
) -> FinishReason | None:
    """Why a row whose tokens so far are ``tokens`` ends now, or ``None`` if it goes on: its last
    token is an end-of-sequence id (``stop``, unless ``ignore_eos``), a stop string appears in the
    decoded tail (``stop``), or its ``max_new`` budget is spent (``length``)."""
    if tokens and tokens[-1] in eos and not ignore_eos:
        return FinishReason.STOP
    if stops:
        tail = decode(list(tokens[-(max(map(len, stops)) + STOP_LOOKBACK) :]))
        if any(s in tail for s in stops):
            return FinishReason.STOP
    if len(tokens) >= max_new:
        return FinishReason.LENGTH
    return None


def result_text(
    tokens: Sequence[int],
    finish: FinishReason | None,
    *,
    eos: set[int] | frozenset[int],
    stops: Sequence[str] | None,
    decode: Decode,
) -> tuple[str, FinishReason]:
    """The text a finished row returns and its finish reason: the end-of-sequence token that
    stopped it is dropped, and the text is cut before the first occurrence of each stop string
    in turn (a cut is a ``stop``)."""
    ids = list(tokens)
    if ids and ids[-1] in eos and finish == FinishReason.STOP:
        ids = ids[:-1]
    text = decode(ids)
    reason = finish or FinishReason.LENGTH
    for stop in stops or []:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
            reason = FinishReason.STOP
    return text, reason


def stop_string(
    tokens: Sequence[int], *, eos: set[int] | frozenset[int], stops: Sequence[str] | None, decode: Decode
) -> str | None:
    """The stop string that ended a finished row: the one :func:`result_text` cut at first (None
    when no stop string occurs: the end-of-sequence token or the budget ended it)."""
    if not stops:
        return None
    ids = list(tokens)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    text = decode(ids)
    found = [(text.find(s), i, s) for i, s in enumerate(stops) if s in text]
    return min(found)[2] if found else None
