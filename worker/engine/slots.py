"""Continuous batching over a slot KV cache: each row's keys and values in a preallocated slot.

Prefill runs in length-sorted groups of about :data:`PREFILL_TOKENS` padded tokens, left-padded,
with the logits of the last position only.  Each row's keys and values are then copied, unpadded,
into its slot of a :class:`SlotCache`; a decode step writes every row's new key and value at that
row's own position and attends over a per-row mask, so no step re-creates the cache (no
``torch.cat``) or depends on a neighbour's length.  Rows that finish leave at once: the last row's
slot is moved into the hole, and freed slots are refilled with the next items of the micro-batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from worker.core.errors import ShutdownRequested
from worker.engine.forward import Forward
from worker.engine.prompts import Prepared
from worker.engine.rows import Row, RowRules

PREFILL_TOKENS = 512
"""Padded prompt tokens per prefill forward pass.  Enough rows for full-speed matrix products, few
enough that the activations (tokens × intermediate size) stay in cache: on the 2-core EPYC of
docs/BENCHMARKS.md the benchmark's 4,215 prompt tokens prefill in 8.9 s at 256–512 tokens per
pass, 9.1 s at 1,024 and 10.4 s at 2,048.  It also bounds activation memory."""

Finished = Callable[[list[Row]], None]
"""Called with rows as soon as they are done."""


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class SlotCache(Cache):
    """A KV cache of ``rows`` preallocated slots, one per batch row, for decode steps.

    Slot ``i`` holds the keys and values of row ``i`` from position 0 to ``lengths[i] - 1``, with no
    padding in front.  Before each decode step :meth:`step` says which rows take part (the first
    ``n``) and where each row's new token goes; the model's attention layers call :meth:`update`,
    which writes the new keys and values in place and returns views of the first ``n`` slots up to
    the longest row.  The mask that hides each row's unused tail is built by the caller.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.capacity = capacity
        self.key_slots: list[torch.Tensor] = []
        self.value_slots: list[torch.Tensor] = []
        self.lengths = [0] * rows
        self._n = 0
        self._span = 0
        self._index: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return bool(self.key_slots)

    def allocate(self, like: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Allocate every layer's slots with the heads, head size, dtype and device of ``like``."""
        self.key_slots, self.value_slots = [], []
        for k, v in like:
            self.key_slots.append(k.new_zeros((self.rows, k.shape[1], self.capacity, k.shape[3])))
            self.value_slots.append(v.new_zeros((self.rows, v.shape[1], self.capacity, v.shape[3])))

    def absorb(self, prefill: Any, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Copy each row of a left-padded prefill cache (a ``DynamicCache``) into its slot."""
        layers = layer_tensors(prefill)
        if not self.ready:
            self.allocate(layers)
        for (k, v), kk, vv in zip(layers, self.key_slots, self.value_slots, strict=True):
            padded = k.shape[2]
            for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
                kk[slot, :, :n] = k[row, :, padded - n :]
                vv[slot, :, :n] = v[row, :, padded - n :]
        for slot, n in zip(slots, lengths, strict=True):
            self.lengths[slot] = n

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` onto slot ``dst`` (compacting after ``dst``'s row finished)."""
        n = self.lengths[src]
        for kk, vv in zip(self.key_slots, self.value_slots, strict=True):
            kk[dst, :, :n] = kk[src, :, :n]
            vv[dst, :, :n] = vv[src, :, :n]
        self.lengths[dst] = n

    def step(self, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Prepare a decode step for the first ``n`` rows: their positions, and the key span."""
        pos = torch.tensor(self.lengths[:n], dtype=torch.long, device=device)
        self._n = n
        self._span = max(self.lengths[:n]) + 1
        self._index = torch.arange(n, device=device)
        self._pos = pos
        return pos, self._span

    def advance(self) -> None:
        for i in range(self._n):
            self.lengths[i] += 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kk, vv = self.key_slots[layer_idx], self.value_slots[layer_idx]
        kk[self._index, :, self._pos] = key_states[:, :, 0]
        vv[self._index, :, self._pos] = value_states[:, :, 0]
        return kk[: self._n, :, : self._span], vv[: self._n, :, : self._span]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return max(self._span - 1, 0)

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        return self._span, 0


class SlotDecoder:
    """Continuous batching of one micro-batch over a :class:`SlotCache`."""

    def __init__(self, forward: Forward, rules: RowRules) -> None:
        self.forward = forward
        self.rules = rules

    def run(
        self,
        batch: list[Prepared],
        slots: int,
        finished: Finished,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Decode ``batch`` with ``slots`` rows at a time, refilling freed rows from the queue.
        ``should_stop`` is asked before each refill (the first admission was checked by the
        caller); once it says so, the rows in flight finish and :class:`ShutdownRequested` is
        raised for the items not started."""
        queue = deque(sorted(batch, key=lambda p: (len(p.ids), p.max_new)))
        cache = SlotCache(slots, capacity=max(len(p.ids) + p.max_new for p in batch))
        active: list[Row] = []
        tokens: list[int] = []  # each active row's last token, the next step's input
        refill_at = max(1, slots // 8)
        stopping = False
        refill = False
        fwd = self.forward
        while queue or active:
            free = slots - len(active)
            if queue and not stopping and free >= min(refill_at, len(queue)):
                if refill and should_stop is not None and should_stop():
                    stopping = True
                else:
                    refill = True
                    rows = [Row.start(queue.popleft()) for _ in range(min(free, len(queue)))]
                    first = self._prefill(rows, cache, len(active))
                    active += rows
                    tokens += first
                    self._settle(active, tokens, cache, range(len(active) - len(rows), len(active)), finished)
                    continue  # admitting may have freed rows again
            if not active:
                break
            n = len(active)
            pos, span = cache.step(n, fwd.device)
            step = torch.tensor(tokens, dtype=torch.long, device=fwd.device).unsqueeze(1)
            logits = fwd(step, fwd.decode_mask(pos, span), pos.unsqueeze(1), cache)
            cache.advance()
            tokens = self.rules.pick(logits, active)
            self._settle(active, tokens, cache, range(n), finished)
        if queue:
            raise ShutdownRequested(f"stopping with {len(queue)} items not started")

    def _settle(
        self, active: list[Row], tokens: list[int], cache: SlotCache, fresh: range, finished: Finished
    ) -> None:
        """Record ``tokens`` for the rows in ``fresh``; drop finished rows, compacting the slots."""
        done = [i for i in fresh if self.rules.add(active[i], tokens[i])]
        if not done:
            return
        finished([active[i] for i in done])
        for i in reversed(done):  # highest first: the last row is always one that stays
            last = len(active) - 1
            if i != last:
                cache.move(last, i)
                active[i], tokens[i] = active[last], tokens[last]
            active.pop()
            tokens.pop()

    def _prefill(self, rows: list[Row], cache: SlotCache, first_slot: int) -> list[int]:
        """Prefill ``rows`` (sorted by length) in groups; fill slots from ``first_slot``; first tokens."""
        picks: list[int] = []
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and len(rows[end].prep.ids) * (end + 1 - start) <= PREFILL_TOKENS:
                end += 1
            group = rows[start:end]
            ids, mask, positions = self.forward.left_pad([r.prep.ids for r in group])
            prefill = DynamicCache()
            logits = self.forward(ids, mask, positions, prefill, last_only=True)
            cache.absorb(
                prefill, range(first_slot + start, first_slot + end), [len(r.prep.ids) for r in group]
            )
            picks += self.rules.pick(logits, group)
            del logits, prefill
            start = end
        return picks
