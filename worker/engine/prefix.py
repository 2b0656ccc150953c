"""Shared-prefix reuse: find the leading tokens items share, and keep their KV once per worker.

Bulk jobs mostly repeat one system prompt or instruction on every line.  Its keys and values are
the same for every item (they depend only on the token ids and their positions), so they are
computed once, kept in a :class:`PrefixCache` keyed by the token ids, and copied into the slot of
every row that starts with them; only the rest of each prompt is prefilled.

:func:`mark_shared_prefixes` finds the prefixes without being told about system prompts: items
sorted by token ids put every group sharing a beginning next to each other, and a run of
neighbours whose common prefix is at least :data:`PREFIX_MIN_TOKENS` long shares the shortest of
their common prefixes.  Each item keeps at least one token of its own, so its first generated
token comes from its own prefill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.prompts import Prepared

PREFIX_MIN_TOKENS = 32
"""Shorter shared beginnings are prefilled with their rows: below this, copying and bookkeeping
save too little (and a prefix pass of few tokens runs the matrix units badly)."""
PREFIX_CACHE_BYTES = 256 << 20
"""The most memory the kept prefixes hold (least recently used dropped first).  A 400-token prefix
of the 200M benchmark model holds 6.6 MB; of Qwen2.5-7B in bf16, 23 MB."""


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def mark_shared_prefixes(prepared: Sequence[Prepared], min_tokens: int = PREFIX_MIN_TOKENS) -> int:
    """Set ``prefix`` on every item of ``prepared`` (0 for items that share no long beginning);
    returns how many items got one."""
    ordered = sorted(prepared, key=lambda p: p.ids)
    marked = 0
    run: list[Prepared] = []
    shared = 0

    def close() -> None:
        nonlocal marked
        if len(run) > 1:
            for p in run:
                p.prefix = min(shared, len(p.ids) - 1)
            marked += len(run)
        else:
            for p in run:
                p.prefix = 0

    for prep in ordered:
        n = common_length(run[-1].ids, prep.ids) if run else 0
        if run and min(n, shared or n) >= min_tokens:
            shared = min(n, shared or n)
            run.append(prep)
            continue
        close()
        run, shared = [prep], 0
    close()
    return marked


@dataclass
class PrefixKV:
    """One prefix's keys and values: per layer ``[kv heads, length, head size]``, on that layer's
    device."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    adapter: str | None = None
    """The adapter whose weights computed them: the same ids give other keys and values through
    another adapter (its LoRA changes the key and value projections and every layer's input)."""

    @property
    def key(self) -> PrefixKey:
        return (self.adapter, self.ids)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


PrefixKey = tuple[str | None, tuple[int, ...]]
"""(adapter, token ids)."""


class PrefixCache:
    """Prefix KV kept across micro-batches and chunks, keyed by adapter and token ids, least
    recently used dropped first beyond ``max_bytes``.  The keys and values also depend on the
    weights: one cache belongs to one engine (one model and its adapters); clear it if those ever
    change."""

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[PrefixKey, PrefixKV] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[PrefixKV]:
        """The kept prefixes, least recently used first."""
        return list(self._entries.values())

    def get(self, ids: tuple[int, ...], adapter: str | None = None) -> PrefixKV | None:
        entry = self._entries.get((adapter, ids))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((adapter, ids))
        self.hits += 1
        return entry

    def put(self, entry: PrefixKV) -> None:
        self._entries[entry.key] = entry
        self._entries.move_to_end(entry.key)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every prefix and the hit and miss counts."""
        self._entries.clear()
        self.hits = self.misses = 0
