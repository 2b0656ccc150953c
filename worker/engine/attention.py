"""Decode attention over each row's live span: no row pays for the longest row's length.

A slot-cache decode pass hands every attention layer the pass's slots up to the longest row
(``span``) and a mask hiding what lies past each row's own length.  sdpa then reads every row's
keys and values up to ``span``: on a CPU, where a decode step's attention is bound by the bytes
it reads, a row of 40 tokens beside one of 400 costs as much as the long one.

Here the rows of a decode pass are cut into contiguous runs (:func:`live_chunks`), each attended
over its own longest row only: a run whose rows all have one length needs no mask at all (a run of
one row is exactly what a lone row gets), a run of different lengths keeps the mask, cut to its
span.  A run ends where carrying on would read more masked-out keys than another attention call
costs (:data:`CHUNK_OVERHEAD`), so rows of similar lengths share one call and a row far from its
neighbours gets its own.  The engine keeps a pass's rows ordered by length where it can
(:mod:`worker.engine.slots`), which keeps runs long.

Prefill passes (several tokens per row) and passes without run information take transformers'
sdpa path unchanged: :func:`slot_attention` is registered with transformers as
:data:`SLOT_ATTENTION` and falls back to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

SLOT_ATTENTION = "genq_slots"
"""The name :func:`slot_attention` is registered under with transformers."""

CHUNK_OVERHEAD = 96
"""What one more attention call costs, in keys read by one row (on the 2-core EPYC of
docs/BENCHMARKS.md a call costs ~10 µs, about the time one row's keys and values take to read for
~100 positions of the benchmark model's layer)."""


class Chunk(NamedTuple):
    """Rows ``lo … hi - 1`` of a decode pass, attended over their first ``span`` keys."""

    lo: int
    hi: int
    span: int
    exact: bool
    """Every row of the run has ``span`` keys: no mask needed."""


def live_chunks(lengths: Sequence[int], overhead: int = CHUNK_OVERHEAD) -> list[Chunk]:
    """Cut rows with ``lengths`` keys each (in their order in the pass) into contiguous runs: a
    run grows while the keys it would read past its rows' own lengths stay within ``overhead``."""
    chunks: list[Chunk] = []
    lo = span = live = 0
    low = 0
    for r, n in enumerate(lengths):
        wider = max(span, n)
        if r > lo and (r + 1 - lo) * wider - (live + n) > overhead:
            chunks.append(Chunk(lo, r, span, low == span))
            lo, span, live, low = r, n, n, n
        else:
            span, live, low = wider, live + n, n if r == lo else min(low, n)
    if lengths:
        chunks.append(Chunk(lo, len(lengths), span, low == span))
    return chunks


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    slot_chunks: Sequence[Chunk] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run per :class:`Chunk` of ``slot_chunks`` for a decode pass
    (one query per row); sdpa as it is for anything else."""
    if not slot_chunks or query.shape[2] != 1 or attention_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    out = chunked_attention(query.reshape(rows, heads, dim), key, value, attention_mask, slot_chunks, scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    chunks: Sequence[Chunk],
    scale: float | None,
) -> torch.Tensor:
    """Decode attention of one query per row, ``query`` ``[rows, heads, head size]`` over ``key``
    and ``value`` ``[rows, key heads, span, head size]``, each run of ``chunks`` over its own span
    (``visible``, ``[rows, 1, 1, span]``, masks a run whose rows differ in length).  The query heads
    sharing a key head side by side, as one query block per key head (what transformers does for
    one query; sdpa's own GQA path copies the keys on the CPU).  ``[rows, key heads, heads per key
    head, head size]``."""
    rows, heads, dim = query.shape
    packed = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)
    outs = []
    for c in chunks:
        mask = None if c.exact else visible[c.lo : c.hi, :, :, : c.span]
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                packed[c.lo : c.hi],
                key[c.lo : c.hi, :, : c.span],
                value[c.lo : c.hi, :, : c.span],
                attn_mask=mask,
                scale=scale,
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def register() -> None:
    """Make :data:`SLOT_ATTENTION` known to transformers (attention and mask); idempotent."""
    if SLOT_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(SLOT_ATTENTION, slot_attention)
        AttentionMaskInterface.register(SLOT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def slot_attention_on(model: torch.nn.Module) -> Iterator[None]:
    """``model``'s attention layers use :func:`slot_attention` for the duration (its config is set
    back after): a model stays exactly as loaded outside the engine's own passes."""
    register()
    config: Any = model.config
    before = config._attn_implementation
    config._attn_implementation = SLOT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
