"""A compact index of the item ids seen so far, for duplicate detection while streaming.

A million ids held as Python strings in a dict cost ~150 MB; this keeps a 64-bit hash and the
line number of each id (12 bytes) in sorted numpy arrays, plus a small dict for the ids of the
current block.  Memory grows by 12 bytes an item, never with the ids' length.

Two different ids share a 64-bit hash with a probability of about n²/2⁶⁵ (under 10⁻⁶ for five
million ids); such a pair would be refused as a duplicate, never merged.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1 << 16
"""Ids kept in the dict before they are merged into the sorted arrays."""

_MASK = (1 << 64) - 1


class IdIndex:
    def __init__(self) -> None:
        self._hashes = np.empty(0, dtype=np.uint64)
        self._lines = np.empty(0, dtype=np.uint32)
        self._block: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._hashes) + len(self._block)

    @staticmethod
    def _key(item_id: str) -> int:
        return hash(item_id) & _MASK  # stable within the process: all this index needs

    def line_of(self, item_id: str) -> int | None:
        """The line that holds ``item_id``, if any."""
        key = self._key(item_id)
        line = self._block.get(key)
        if line is not None:
            return line
        if len(self._hashes):
            pos = int(np.searchsorted(self._hashes, np.uint64(key)))
            if pos < len(self._hashes) and int(self._hashes[pos]) == key:
                return int(self._lines[pos])
        return None

    def add(self, item_id: str, line: int) -> None:
        self._block[self._key(item_id)] = line
        if len(self._block) >= BLOCK:
            self._merge()

    def _merge(self) -> None:
        """Merge the block into the sorted arrays.  The block is sorted on its own (small), and
        ``np.insert`` at the positions ``searchsorted`` gives builds each merged array once: at the
        peak the old and the new arrays coexist (about 24 bytes an item), where a concatenation
        and an ``argsort`` held about 44."""
        keys = np.fromiter(self._block.keys(), dtype=np.uint64, count=len(self._block))
        lines = np.fromiter(self._block.values(), dtype=np.uint32, count=len(self._block))
        order = np.argsort(keys)
        keys, lines = keys[order], lines[order]
        at = np.searchsorted(self._hashes, keys)
        self._hashes = np.insert(self._hashes, at, keys)
        self._lines = np.insert(self._lines, at, lines)
        self._block = {}
