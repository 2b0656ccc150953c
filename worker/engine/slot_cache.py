"""The slot KV cache: one preallocated slot per batch row, written in place by every pass.

Slot ``i`` holds the keys and values of row ``i`` from position 0 to ``lengths[i] - 1``, with no
padding in front.  A pass covers a contiguous range of slots ``[lo, hi)``:

* a **prefill** pass (:meth:`SlotCache.begin_prefill`) feeds each row's new tokens, left-padded to
  a common width; row ``r``'s real tokens are written at positions ``starts[r] …`` of its slot
  (``starts[r]`` > 0 when the row begins with a shared prefix already copied there), its padding to
  a scratch position past the capacity that no row ever attends to;
* a **packed prefill** pass (:meth:`SlotCache.begin_packed`) feeds the same tokens end to end in
  one row, with no padding, for a caller that computes attention per row itself (the engine's own
  pass, :mod:`worker.engine.llama`);
* a **decode** pass (:meth:`SlotCache.begin_decode`) feeds one token per row, written at the row's
  own length.

Each pass returns the positions and the visibility (row ``r``'s query at position ``q`` sees its
keys ``0 … q``) the model needs; the attention layers call :meth:`SlotCache.update`, which writes
the new keys and values and returns views of the pass's slots up to the longest row.

Devices: a layer's slots are allocated on its first update, with the device and dtype of the keys
it is given, so when ``device_map`` spreads layers over GPUs and the CPU each layer's cache lives
where the layer runs; the write indices are kept per device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache

from worker.engine.attention import Chunk, live_chunks
from worker.engine.prefix import PrefixKV


class Segment(NamedTuple):
    """One row of a packed prefill pass (:meth:`SlotCache.begin_packed`)."""

    row: int
    """The row's index in the pass (its slot is the pass's first slot + ``row``)."""
    first: int
    """Where its new tokens begin in the pass's one row of tokens."""
    tokens: int
    """Its new tokens."""
    start: int
    """Positions already in its slot before them (a shared prefix)."""


def segment_visibility(segment: Segment) -> torch.Tensor:
    """What each of ``segment``'s new tokens sees of its slot, ``[1, 1, tokens, start + tokens]``
    (bool): its prefix and itself, causally."""
    keys = torch.arange(segment.start + segment.tokens, dtype=torch.long)
    queries = torch.arange(segment.start, segment.start + segment.tokens, dtype=torch.long)
    return (keys[None, :] <= queries[:, None])[None, None]


class SlotCache(Cache):
    """A KV cache of ``rows`` preallocated slots of ``capacity`` positions (see the module)."""

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.capacity = capacity
        self.key_slots: list[torch.Tensor] = []
        self.value_slots: list[torch.Tensor] = []
        self.lengths = [0] * rows
        self._lo = self._hi = 0
        self._span = 0
        self._queries = 1
        self._write: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))
        """(slot, position) of every token of the pass, [rows of the pass, tokens], on the CPU."""
        self._write_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._copies: list[tuple[int, PrefixKV]] = []
        """Prefixes to copy into slots at each layer's update in this pass."""
        self.chunks: list[Chunk] | None = None
        """A decode pass's rows in runs of similar lengths, each attended over its own longest
        row's keys only (:func:`worker.engine.attention.live_chunks`); None for a prefill pass."""

    @property
    def ready(self) -> bool:
        return bool(self.key_slots)

    @property
    def span(self) -> int:
        return self._span

    # --- passes ----------------------------------------------------------------------------------

    def begin_prefill(
        self,
        lo: int,
        starts: Sequence[int],
        lengths: Sequence[int],
        width: int,
        prefixes: Sequence[PrefixKV | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pass over slots ``lo … lo + len(starts) - 1`` feeding ``lengths[r]`` new tokens of row
        ``r`` after its first ``starts[r]`` (a prefix from ``prefixes[r]``, copied into the slot
        during the pass), left-padded to ``width``.  Returns the positions ``[rows, width]`` and the
        visibility ``[rows, 1, width, span]`` (bool, on the CPU)."""
        n = len(starts)
        start = torch.tensor(starts, dtype=torch.long)[:, None]
        pad = width - torch.tensor(lengths, dtype=torch.long)[:, None]
        t = torch.arange(width, dtype=torch.long)[None, :]
        real = t >= pad
        pos = start + t - pad
        self._span = max(s + m for s, m in zip(starts, lengths, strict=True))
        slots = torch.arange(lo, lo + n, dtype=torch.long)[:, None].expand(n, width).contiguous()
        self._begin(lo, lo + n, width, slots, torch.where(real, pos, self.capacity))
        self._copies = [(lo + r, p) for r, p in enumerate(prefixes or []) if p is not None]
        self.chunks = None
        for r, (s, m) in enumerate(zip(starts, lengths, strict=True)):
            self.lengths[lo + r] = s + m
        keys = torch.arange(self._span, dtype=torch.long)
        visible = (keys[None, None, :] <= pos[:, :, None]) & real[:, :, None]
        visible[:, :, 0] |= ~real  # padding sees one key, so no softmax row is empty
        return torch.where(real, pos, 0), visible[:, None]

    def begin_packed(
        self,
        lo: int,
        starts: Sequence[int],
        lengths: Sequence[int],
        prefixes: Sequence[PrefixKV | None] | None = None,
    ) -> tuple[torch.Tensor, list[Segment]]:
        """:meth:`begin_prefill` with the rows' new tokens end to end in one row of
        ``sum(lengths)`` tokens instead of left-padded side by side: no product is spent on
        padding.  Returns the positions ``[1, sum(lengths)]`` and each row's :class:`Segment`;
        attention is the caller's, per segment (the pass's slots from :meth:`write`, row
        ``segment.row``, its first ``start + tokens`` keys: :func:`segment_visibility`)."""
        n = len(starts)
        segments, first = [], 0
        for r, (s, m) in enumerate(zip(starts, lengths, strict=True)):
            segments.append(Segment(r, first, m, s))
            first += m
            self.lengths[lo + r] = s + m
        pos = torch.cat([torch.arange(s.start, s.start + s.tokens, dtype=torch.long) for s in segments])
        slots = torch.repeat_interleave(
            torch.arange(lo, lo + n, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
        )
        self._span = max(s + m for s, m in zip(starts, lengths, strict=True))
        self._begin(lo, lo + n, max(lengths), slots[None], pos[None])
        self._copies = [(lo + r, p) for r, p in enumerate(prefixes or []) if p is not None]
        self.chunks = None
        return pos[None], segments

    def begin_decode(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A pass feeding one token to each of the first ``n`` rows.  Returns the positions
        ``[n, 1]`` and the visibility ``[n, 1, 1, span]`` (bool, on the CPU)."""
        pos = torch.tensor(self.lengths[:n], dtype=torch.long)
        self._span = max(self.lengths[:n]) + 1
        self._begin(0, n, 1, torch.arange(n, dtype=torch.long)[:, None], pos[:, None])
        self._copies = []
        for i in range(n):
            self.lengths[i] += 1
        self.chunks = live_chunks(self.lengths[:n])
        visible = torch.arange(self._span, dtype=torch.long)[None, :] <= pos[:, None]
        return pos[:, None], visible[:, None, None, :]

    def _begin(self, lo: int, hi: int, queries: int, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self._lo, self._hi, self._queries = lo, hi, queries
        self._write = (slots, positions)
        self._write_on = {}

    def _write_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._write_on.get(device)
        if index is None:
            index = (self._write[0].to(device), self._write[1].to(device))
            self._write_on[device] = index
        return index

    # --- what the attention layers call ------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the pass's keys and values ``[rows, heads, tokens, head size]`` into the slots of
        layer ``layer_idx`` (allocated here on first use, where the layer runs); return the pass's
        slots up to the longest row."""
        return self.write(layer_idx, key_states.transpose(1, 2), value_states.transpose(1, 2))

    def write(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` for keys and values laid out ``[rows, tokens, heads, head size]`` (as a
        projection's output is): the pass's slots of layer ``layer_idx``, ``[rows, heads, span,
        head size]``, after the write."""
        if layer_idx == len(self.key_slots):
            self.key_slots.append(self._new_slots(keys))
            self.value_slots.append(self._new_slots(values))
        kk, vv = self.key_slots[layer_idx], self.value_slots[layer_idx]
        for slot, prefix in self._copies:
            kk[slot, :, : prefix.length] = prefix.keys[layer_idx]
            vv[slot, :, : prefix.length] = prefix.values[layer_idx]
        slots, positions = self._write_index(kk.device)
        kk[slots, :, positions] = keys
        vv[slots, :, positions] = values
        return kk[self._lo : self._hi, :, : self._span], vv[self._lo : self._hi, :, : self._span]

    def _new_slots(self, like: torch.Tensor) -> torch.Tensor:
        """Zeroed slots for keys or values like ``like`` (``[rows, tokens, heads, head size]``),
        with one position past the capacity: where padding tokens are written, never attended to."""
        return like.new_zeros((self.rows, like.shape[2], self.capacity + 1, like.shape[3]))

    def layer(self, layer_idx: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[heads, length, head size]`` of ``slot`` in layer ``layer_idx``."""
        n = self.lengths[slot]
        return self.key_slots[layer_idx][slot, :, :n], self.value_slots[layer_idx][slot, :, :n]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` onto slot ``dst`` (compacting after ``dst``'s row finished)."""
        n = self.lengths[src]
        for kk, vv in zip(self.key_slots, self.value_slots, strict=True):
            kk[dst, :, :n] = kk[src, :, :n]
            vv[dst, :, :n] = vv[src, :, :n]
        self.lengths[dst] = n

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return max(self._span - self._queries, 0)

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        return self._span, 0
