"""What an embedded run's output file was made from, so a rerun reuses only what belongs.

Beside ``results.jsonl`` lives ``results.jsonl.genq``: a header (the output format, the profile,
the input, and the job's spec as `genq submit` would store it) and, per item id, the digest of
the request it answers (:mod:`worker.core.identity`).
A rerun keeps a row only when its id is still in the input with the same digest; every other
item is generated (again).  The output is first cut down to the rows kept, in input order, and
the manifest rewritten, both atomically and together, before any new row is appended, so the
two always agree.

Streamed, so that memory does not grow with the input: :func:`prepare_output` reads the input a
window at a time (the caller's windows), looks each item up in an index of the existing output
and its manifest that lives on disk (a temporary SQLite database, built row by row), and writes
the rows kept, the new manifest and the input positions of the rows kept (:class:`Positions`,
8 bytes an item on disk) as it goes.

Refused, with a one-line error naming the way out: an output that exists without a manifest (it
was not written by `genq run`), and an output in the other format (one file never mixes formats).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core.errors import OutputPathError
from worker.core.identity import item_digest
from worker.core.outputs import (
    OutputFormat,
    dumps_row,
    iter_rows,
    replaced_together,
    row_count_field,
    trim_partial_line,
)
from worker.core.schema import Counts, Item, JobSpec

VERSION = 1

BATCH = 1000
"""Rows inserted into the index per statement."""


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".genq")


class Positions:
    """Input positions in ascending order, on disk (a temporary file, 8 bytes each): written
    once, then read back in order as often as needed."""

    BLOCK = 8192

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._buffer = array("q")
        self.count = 0
        self.first: int | None = None
        self.last: int | None = None

    def add(self, position: int) -> None:
        self._buffer.append(position)
        self.count += 1
        if self.first is None:
            self.first = position
        self.last = position
        if len(self._buffer) >= self.BLOCK:
            self._flush()

    def _flush(self) -> None:
        self._fh.write(self._buffer.tobytes())
        self._buffer = array("q")

    def __iter__(self) -> Iterator[int]:
        self._flush()
        self._fh.flush()
        fd, offset, step = self._fh.fileno(), 0, self.BLOCK * 8
        while block := os.pread(fd, step, offset):
            offset += len(block)
            yield from array("q", block)

    def close(self) -> None:
        self._fh.close()


@dataclass
class Resume:
    """What a rerun reuses from an existing output (its rows are already in it, in input order)."""

    positions: Positions = field(default_factory=Positions)
    """The input positions of the rows kept: same id, same request."""
    counts: Counts = field(default_factory=Counts)
    """The rows kept, counted by what they stand for (``total``: the input's items)."""
    changed: int = 0
    """Items that have a row answering a different request: generated again."""
    first_changed: Item | None = None
    end: int = 0
    """The output's size in bytes once cut down to the rows kept (new rows start there)."""
    peak_held: int = 0
    """The most input items held at once while planning (a window's)."""

    @property
    def kept(self) -> int:
        return self.positions.count


class _Index:
    """The rows of an existing output by id (the first row of an id wins, as in the job store),
    with the digest its manifest gives each: on disk, whatever the output's size."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.db = sqlite3.connect("", isolation_level=None)  # a private temporary database on disk
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE rows (id TEXT PRIMARY KEY, line BLOB, field TEXT) WITHOUT ROWID")
        self.db.execute("CREATE TABLE digests (id TEXT PRIMARY KEY, digest TEXT) WITHOUT ROWID")
        self.rows = 0
        self.header: dict[str, Any] = {}

    def add_rows(self) -> int:
        """Index the output's rows; returns how many ids it holds."""
        batch: list[tuple[str, bytes, str]] = []
        self.db.execute("BEGIN")
        for row_id, row, raw in iter_rows(self.output):
            batch.append((row_id, raw if raw.endswith(b"\n") else raw + b"\n", str(row_count_field(row))))
            if len(batch) >= BATCH:
                self._insert_rows(batch)
                batch = []
        self._insert_rows(batch)
        self.db.execute("COMMIT")
        return self.rows

    def _insert_rows(self, batch: list[tuple[str, bytes, str]]) -> None:
        before = self.db.total_changes
        self.db.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?, ?)", batch)
        self.rows += self.db.total_changes - before

    def add_manifest(self, manifest: Path) -> None:
        """Read the manifest's header and index its digests (the last entry of an id wins)."""
        self.db.execute("BEGIN")
        with open(manifest, encoding="utf-8") as fh:
            batch: list[tuple[str, str]] = []
            for n, line in enumerate(fh):
                entry = json.loads(line)
                if n == 0:
                    self.header = entry
                    continue
                batch.append((entry[0], entry[1]))
                if len(batch) >= BATCH:
                    self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?)", batch)
                    batch = []
            self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?)", batch)
        self.db.execute("COMMIT")

    def find(self, item_id: str) -> tuple[bytes, str, str | None] | None:
        """The row of ``item_id`` (its line, its count field and its digest), if any."""
        found = self.db.execute(
            "SELECT r.line, r.field, d.digest FROM rows r LEFT JOIN digests d ON d.id = r.id WHERE r.id = ?",
            (item_id,),
        ).fetchone()
        return None if found is None else (found[0], found[1], found[2])

    def close(self) -> None:
        self.db.close()


def _index(output: Path) -> _Index | None:
    """The existing output indexed with its manifest; None when it holds no row."""
    index = _Index(output)
    try:
        rows = index.add_rows()
        if not rows:
            index.close()
            return None
        manifest = manifest_path(output)
        if not manifest.is_file():
            raise OutputPathError(
                f"{output} already holds {rows} rows that genq run did not write (no {manifest.name} "
                "beside it), so they cannot be matched to this input: choose another -o, or move the "
                "file away"
            )
        try:
            index.add_manifest(manifest)
        except (OSError, ValueError, IndexError, KeyError, TypeError, sqlite3.Error) as exc:
            raise OutputPathError(f"{manifest} cannot be read ({exc}): move {output} and it away") from None
    except BaseException:
        index.close()
        raise
    return index


def prepare_output(
    output: Path,
    windows: Iterable[list[Item]],
    context: str,
    *,
    output_format: Callable[[], OutputFormat],
    spec: Callable[[], JobSpec],
) -> Resume:
    """Read the input (``windows``, in order) once: decide what of ``output`` it may keep, cut
    ``output`` down to those rows, in input order, and write the new manifest (both replaced
    together, only once the whole input was read and found valid: an error leaves both as they
    were).  ``output_format`` and ``spec`` are asked once the input was read (``auto`` is
    decided by it; the spec's total and digest come from it)."""
    trim_partial_line(output)  # a row cut short by a crash is not one
    index = _index(output)
    resume = Resume()
    try:
        with contextlib.ExitStack() as stack:
            if index is not None:
                stack.callback(index.close)
            body = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
            out, manifest = stack.enter_context(replaced_together([output, manifest_path(output)]))
            for window in windows:
                resume.peak_held = max(resume.peak_held, len(window))
                for item in window:
                    resume.counts.total += 1
                    digest = item_digest(item, context)
                    body.write(json.dumps([item.id, digest], ensure_ascii=False) + "\n")
                    found = index.find(item.id) if index is not None else None
                    if found is None:
                        continue
                    line, count_field, old_digest = found
                    if old_digest == digest:
                        out.write(line.decode("utf-8"))
                        resume.positions.add(item.index)
                        setattr(resume.counts, count_field, getattr(resume.counts, count_field) + 1)
                    else:
                        resume.changed += 1
                        resume.first_changed = resume.first_changed or item
            fmt = output_format()
            if index is not None and index.header.get("format") != fmt:
                had = index.header.get("format")
                raise OutputPathError(
                    f"{output} holds {had} rows; this run writes {fmt} rows and one file never "
                    f"mixes them: rerun with --format {had}, or choose another -o"
                )
            job = spec()
            header = {
                "genq_manifest": VERSION,
                "format": fmt,
                "profile": job.profile,
                "input": job.source or "",
            }
            manifest.write(dumps_row({**header, "job": job.model_dump(mode="json")}))
            body.seek(0)
            shutil.copyfileobj(body, manifest)
    except BaseException:
        resume.positions.close()
        raise
    resume.end = output.stat().st_size
    return resume


def put_in_order(output: Path, resume: Resume, new: Positions) -> bool:
    """``output`` holds the rows kept (input positions ``resume.positions``) followed by the new
    ones (``new``), each part in input order: merge them into one file in input order
    (atomically).  Returns whether the file was rewritten (not when it was in order already)."""
    if not resume.kept or not new.count:
        return False
    assert resume.positions.last is not None and new.first is not None
    if resume.positions.last < new.first:
        return False
    with open(output, "rb") as kept_rows, open(output, "rb") as new_rows:
        new_rows.seek(resume.end)
        with replaced_together([output]) as (out,):
            kept, fresh = iter(resume.positions), iter(new)
            k, f = next(kept, None), next(fresh, None)
            while k is not None or f is not None:
                if f is None or (k is not None and k < f):
                    out.write(kept_rows.readline().decode("utf-8"))
                    k = next(kept, None)
                else:
                    out.write(new_rows.readline().decode("utf-8"))
                    f = next(fresh, None)
    return True
