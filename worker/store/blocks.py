"""How a job's inputs are stored: a block of :data:`BLOCK` consecutive items per value.

Redis holds work in flight, not whole jobs.  One hash field per item cost about 230 bytes an
item in Redis (the field, its entry and allocator rounding were as large as the item); a block
holds :data:`BLOCK` items' JSON, one a line, zlib-compressed, in one field ``b<n>`` of
``job:<id>:inputs`` (block *n* holds items ``n × BLOCK`` up to the next block).  A block never
changes once written (a submit writes whole blocks: its pages are whole blocks, the last one
may be short) and leaves Redis when a `genq collect --follow` has drained all of its items
(``lua/drain.lua``; block 0 stays, and an error's input is kept apart for `genq retry`).

Pure functions: no Redis here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence

BLOCK = 50
"""Items per stored value.  A divisor of the submit's page (:data:`worker.store.keys.PAGE`), so a
page is whole blocks; a plain chunk reads one or two of them."""

LEVEL = 6
"""zlib's compression level (its default: a block compresses in about 20 µs)."""


def block_of(index: int) -> int:
    return index // BLOCK


def field(block: int) -> str:
    """The hash field of block ``block`` (``b<n>``: an older genq's one field per item was the
    bare index, so the two layouts never read each other's fields)."""
    return f"b{block}"


def blocks_of(indices: Iterable[int]) -> list[int]:
    """The blocks holding ``indices``, in order, each once."""
    return sorted({i // BLOCK for i in indices})


def encode(lines: Sequence[str]) -> bytes:
    """A block's value: its items' JSON (never a raw newline inside: JSON escapes it), one a line."""
    return zlib.compress("\n".join(lines).encode("utf-8"), LEVEL)


def decode(value: bytes) -> list[str]:
    return zlib.decompress(value).decode("utf-8").split("\n")


def pack(rows: Sequence[tuple[int, str]]) -> Iterator[tuple[int, bytes]]:
    """``(index, Item JSON)`` rows, consecutive from a block's first item, as ``(block, value)``
    pairs; only the last block may be short (the end of the input)."""
    if rows and rows[0][0] % BLOCK:
        raise ValueError(f"inputs are written from a block's first item, not from {rows[0][0]}")
    for start in range(0, len(rows), BLOCK):
        part = rows[start : start + BLOCK]
        first = part[0][0]
        if [i for i, _ in part] != list(range(first, first + len(part))):
            raise ValueError(f"inputs are written in order, without gaps (block {first // BLOCK})")
        yield first // BLOCK, encode([raw for _, raw in part])


def unpack(block: int, value: bytes) -> Iterator[tuple[int, str]]:
    """A stored block's ``(index, Item JSON)``."""
    first = block * BLOCK
    for k, raw in enumerate(decode(value)):
        yield first + k, raw
