"""Reading a JSONL input: lines of bounded length, one UTF-8 byte-order mark, strict JSON
(no NaN, no duplicate keys, no unpaired surrogates)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any, NoReturn

from producer.inputs.words import Problem, safe, show

UTF8_BOM = b"\xef\xbb\xbf"


def read_lines(fh: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line number, content without line ending)``; content is ``None`` when too long.

    Reads at most ``max_line_bytes + 2`` bytes of a line at once, so one huge line cannot exhaust
    memory; the rest of an over-long line is skipped in bounded chunks.
    """
    cap = max_line_bytes + 2
    n = 0
    while True:
        raw = fh.readline(cap + len(UTF8_BOM) if n == 0 else cap)
        if not raw:
            return
        if n == 0 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM) :]
        n += 1
        if len(raw) >= cap and not raw.endswith(b"\n"):
            _skip_rest_of_line(fh)
        content = raw[:-1] if raw.endswith(b"\n") else raw
        if content.endswith(b"\r"):
            content = content[:-1]
        yield n, (None if len(content) > max_line_bytes else content)


def _skip_rest_of_line(fh: IO[bytes]) -> None:
    while True:
        chunk = fh.readline(65536)
        if not chunk or chunk.endswith(b"\n"):
            return


def _reject_constant(name: str) -> NoReturn:
    raise Problem(f"invalid JSON: {name} is not a valid JSON number")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Problem(f"invalid JSON: key {show(key)} appears twice in one object", safe(key))
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)


def parse_line(content: bytes) -> Any:
    """Decode and parse one non-blank line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = content[exc.start]
        raise Problem(f"not valid UTF-8 (byte 0x{bad:02x} at byte {exc.start + 1})") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise Problem(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise Problem("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise Problem(f"invalid JSON: {safe(str(exc))}") from None
