"""Continuous batching over a :class:`SlotCache`: rows leave as they finish, new rows take their place.

Prefill runs in groups of about :data:`PREFILL_TOKENS` tokens (rows sorted by length), packed end
to end where the engine's own pass runs (else left-padded, padding counted),
straight into the rows' slots, with the logits of the last position only.  A row that begins with a
shared prefix (:mod:`worker.engine.prefix`) starts from a copy of that prefix's keys and values and
prefills only the rest of its prompt.  A decode step feeds every row its last token; rows that
finish leave at once (the last row's slot is moved into the hole), and freed slots are refilled
with the next items of the micro-batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from worker.core.errors import ShutdownRequested
from worker.engine.forward import Forward
from worker.engine.prefix import PrefixCache, PrefixKV
from worker.engine.prompts import Prepared
from worker.engine.rows import Row, RowRules
from worker.engine.slot_cache import SlotCache

PREFILL_TOKENS = 512
"""Padded prompt tokens per prefill forward pass.  Enough rows for full-speed matrix products, few
enough that the activations (tokens × intermediate size) stay in cache: on the 2-core EPYC of
docs/BENCHMARKS.md the benchmark's 4,215 prompt tokens prefill in 8.9 s at 256–512 tokens per
pass, 9.1 s at 1,024 and 10.4 s at 2,048.  It also bounds activation memory."""

Finished = Callable[[list[Row]], None]
"""Called with rows as soon as they are done."""


def admission_order(prep: Prepared) -> tuple[tuple[int, ...], int, int]:
    """Items sharing a prefix together, then by length: neighbours in a batch pad little.  (Rows
    of different adapters mix freely: each row of a pass has its own.)"""
    return (tuple(prep.ids[: prep.prefix]), len(prep.ids), prep.max_new)


class SlotDecoder:
    """Continuous batching of one micro-batch over a :class:`SlotCache`."""

    def __init__(self, forward: Forward, rules: RowRules, prefixes: PrefixCache | None = None) -> None:
        self.forward = forward
        self.rules = rules
        self.prefixes = prefixes if prefixes is not None else PrefixCache()
        self.row_steps = 0
        """Token positions computed for rows so far (one per row of each decode step, one per row
        prefilled): what a benchmark divides the tokens kept by."""
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        """Wall seconds spent in prefill passes and in decode steps so far (their logits
        included), for benchmarks to split a run."""

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
        queue = deque(sorted(batch, key=admission_order))
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
                    admit = [queue.popleft() for _ in range(min(free, len(queue)))]
                    # longest first: rows in flight are longer still, so the slots stay ordered by
                    # length, which keeps decode attention's runs of similar rows long
                    rows = [Row.start(p) for p in sorted(admit, key=lambda p: p.prefix - len(p.ids))]
                    first = self._prefill(rows, cache, len(active))
                    active += rows
                    tokens += first
                    self._settle(active, tokens, cache, range(len(active) - len(rows), len(active)), finished)
                    continue  # admitting may have freed rows again
            if not active:
                break
            n = len(active)
            positions, visible = cache.begin_decode(n)
            step = torch.tensor(tokens, dtype=torch.long)[:, None]
            self.row_steps += n
            started = time.perf_counter()
            logits = fwd(step, visible, positions, cache, adapters=[r.prep.adapter for r in active])
            tokens = self.rules.pick(logits, active)
            self.seconds["decode"] += time.perf_counter() - started
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
        """Prefill ``rows`` (sorted by the length they prefill, longest first) in groups of about
        :data:`PREFILL_TOKENS` tokens, into slots from ``first_slot``; returns each row's first
        token.  Packed (end to end, no padding) where the forward pass takes it, else left-padded
        (then a group's width is its longest row's)."""
        picks: list[int] = []
        start = 0
        own = [len(r.prep.ids) - r.prep.prefix for r in rows]
        packs = self.forward.packs
        while start < len(rows):
            end, total = start + 1, own[start]
            while end < len(rows):
                total += own[end]
                cost = total if packs else max(own[start], own[end]) * (end + 1 - start)
                if cost > PREFILL_TOKENS:
                    break
                end += 1
            group = rows[start:end]
            prefixes = [self.prefix_kv(r.prep) for r in group]
            starts = [r.prep.prefix for r in group]
            adapters = [r.prep.adapter for r in group]
            started = time.perf_counter()
            if packs:
                ids = torch.tensor([t for r in group for t in r.prep.ids[r.prep.prefix :]], dtype=torch.long)
                positions, segments = cache.begin_packed(first_slot + start, starts, own[start:end], prefixes)
                logits = self.forward.packed(ids[None], positions, segments, cache)
            else:
                ids = self._left_padded(group)
                positions, visible = cache.begin_prefill(
                    first_slot + start, starts, own[start:end], ids.shape[1], prefixes
                )
                logits = self.forward(ids, visible, positions, cache, last_only=True, adapters=adapters)
            picks += self.rules.pick(logits, group)
            self.seconds["prefill"] += time.perf_counter() - started
            self.row_steps += len(group)
            del logits
            start = end
        return picks

    def _left_padded(self, rows: list[Row]) -> torch.Tensor:
        """The tokens ``rows`` prefill (after their prefixes), left-padded to the longest."""
        own = [r.prep.ids[r.prep.prefix :] for r in rows]
        width = max(map(len, own))
        ids = torch.full((len(rows), width), self.forward.pad_id, dtype=torch.long)
        for i, tokens in enumerate(own):
            ids[i, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        return ids

    def prefix_kv(self, prep: Prepared) -> PrefixKV | None:
        """The keys and values of ``prep``'s shared prefix: kept, or computed once now."""
        if not prep.prefix:
            return None
        ids = tuple(prep.ids[: prep.prefix])
        entry = self.prefixes.get(ids, prep.adapter)
        if entry is None:
            entry = self.compute_prefix(ids, prep.adapter)
            self.prefixes.put(entry)
        return entry

    def compute_prefix(self, ids: tuple[int, ...], adapter: str | None = None) -> PrefixKV:
        """Prefill ``ids`` alone (through ``adapter``), in pieces of :data:`PREFILL_TOKENS`, and keep
        its keys and values."""
        cache = SlotCache(1, len(ids))
        done = 0
        while done < len(ids):
            piece = list(ids[done : done + PREFILL_TOKENS])
            positions, visible = cache.begin_prefill(0, [done], [len(piece)], len(piece))
            piece_ids = torch.tensor([piece], dtype=torch.long)
            self.forward(piece_ids, visible, positions, cache, last_only=True, adapters=[adapter])
            done += len(piece)
        layers = [cache.layer(i, 0) for i in range(len(cache.key_slots))]
        keys, values = [k.clone() for k, _ in layers], [v.clone() for _, v in layers]
        return PrefixKV(ids=ids, keys=keys, values=values, adapter=adapter)
