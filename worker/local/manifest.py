"""What an embedded run's output file was made from, so a rerun reuses only what belongs.

Beside ``results.jsonl`` lives ``results.jsonl.genq``: a header (the output format, the profile,
the input) and, per item id, the digest of the request it answers (:mod:`worker.core.identity`).
A rerun keeps a row only when its id is still in the input with the same digest; every other
item is generated (again).  The manifest is rewritten, atomically, before any new row is
appended, and the output is first cut down to the rows kept, so the two always agree.

Refused, with a one-line error naming the way out: an output that exists without a manifest (it
was not written by `genq run`), and an output in the other format (one file never mixes formats).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core.errors import OutputPathError
from worker.core.outputs import OutputFormat, dumps_row, read_done
from worker.core.schema import Item

VERSION = 1


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".genq")


@dataclass
class Resume:
    """What a rerun reuses from an existing output."""

    keep: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Rows to keep, by item id: same id, same request."""
    changed: list[Item] = field(default_factory=list)
    """Items that have a row answering a different request: generated again."""
    dropped: int = 0
    """Rows of ids no longer in the input (or changed), removed from the output."""


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    header: dict[str, Any] = {}
    digests: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            row = json.loads(line)
            if n == 0:
                header = row
            else:
                digests[row[0]] = row[1]
    return header, digests


def plan_resume(output: Path, items: Iterable[tuple[Item, str]], fmt: OutputFormat) -> Resume:
    """Decide what of ``output`` a run of ``items`` (each with its digest) may keep."""
    manifest = manifest_path(output)
    rows = read_done(output)
    if not rows:
        return Resume()
    if not manifest.is_file():
        raise OutputPathError(
            f"{output} already holds {len(rows)} rows that genq run did not write (no {manifest.name} "
            "beside it), so they cannot be matched to this input: choose another -o, or move the file away"
        )
    try:
        header, digests = _read(manifest)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise OutputPathError(f"{manifest} cannot be read ({exc}): move {output} and it away") from None
    if header.get("format") != fmt:
        raise OutputPathError(
            f"{output} holds {header.get('format')} rows; this run writes {fmt} rows and one file never "
            f"mixes them: rerun with --format {header.get('format')}, or choose another -o"
        )
    plan = Resume()
    for item, digest in items:
        row = rows.get(item.id)
        if row is None:
            continue
        if digests.get(item.id) == digest:
            plan.keep[item.id] = row
        else:
            plan.changed.append(item)
    plan.dropped = len(rows) - len(plan.keep)
    return plan


def write_manifest(
    output: Path, fmt: OutputFormat, profile: str, source: str, entries: Iterable[tuple[str, str]]
) -> None:
    """Write the manifest for this run (atomically): ``entries`` are ``(item id, digest)``."""
    target = manifest_path(output)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(dumps_row({"genq_manifest": VERSION, "format": fmt, "profile": profile, "input": source}))
        for item_id, digest in entries:
            fh.write(json.dumps([item_id, digest], ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def rewrite_rows(output: Path, order: Iterable[Item], rows: dict[str, dict[str, Any]]) -> None:
    """Rewrite ``output`` with the rows of ``order``'s items that ``rows`` holds, in that order
    (atomic: a crash leaves the old file or the new one)."""
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for item in order:
            row = rows.get(item.id)
            if row is not None:
                fh.write(dumps_row(row))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, output)
