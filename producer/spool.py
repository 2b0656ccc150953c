"""The local side of `genq collect --follow`: results spooled to segment files, merged into the
output in input order at the end.

The spool is a folder next to the output, ``.<output name>.genq-follow/``:

* ``state.json``: the job, the format and the ``created`` time of OpenAI rows (fixed at the
  first start, so a restarted collector writes the same bytes);
* ``seg-<seq>-L<level>.jsonl``: segments, each sorted by item index, one line per result:
  ``<index> TAB <kind> TAB <sha1 of the stored result> TAB <output row>``; ``kind`` is ``o``
  (succeeded), ``e`` (errored) or ``n`` (cancelled or expired: never ran).  A segment is written
  to a temporary name, fsynced and renamed (then the folder fsynced) before its results leave
  Redis: a segment on disk is durable, a ``.tmp`` one is debris of a kill and is removed.

Memory stays flat: a page of results at a time while following, and a k-way merge (``heapq``) of
at most :data:`FAN_IN` open segments.  Segments are compacted while following (a run of
:data:`FAN_IN` consecutive segments of one level becomes one of the next level, so a follow of
any length keeps a few dozen files), and for the same item a newer segment wins: a retried
item's new result replaces its error.  At the end the segments (at most :data:`FAN_IN` after a
last compaction) are merged once more into the output (and errors file), which is replaced
atomically.  The spool is kept for a later ``genq retry`` only when the job had errors (the
retried results then merge into the output: the same command again); otherwise it goes.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.core.errors import FollowConflict
from worker.core.outputs import check_output_path, replaced_together

FAN_IN = 16
"""Segments merged at once (files open together while merging)."""

_SEGMENT = re.compile(r"^seg-(\d{8})-L(\d+)\.jsonl$")


@dataclass(frozen=True)
class Segment:
    seq: int
    level: int
    path: Path


@dataclass(frozen=True)
class SpoolLine:
    index: int
    kind: str
    digest: str
    row: str
    """The output line, newline included."""


def encode(line: SpoolLine) -> str:
    return f"{line.index}\t{line.kind}\t{line.digest}\t{line.row}"


def decode(raw: str) -> SpoolLine:
    index, kind, digest, row = raw.split("\t", 3)
    return SpoolLine(int(index), kind, digest, row)


def spool_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.genq-follow"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool of one output file, for one job."""

    def __init__(self, output: Path, job_id: str, fmt: str) -> None:
        self.output = output
        self.folder = spool_folder(output)
        self.job_id = job_id
        self.fmt = fmt
        self.created = int(time.time())

    @property
    def exists(self) -> bool:
        return (self.folder / "state.json").exists()

    def open(self) -> None:
        """Create the folder, or take up an existing one (refused when it follows another job
        or another format); removes what a kill left half-written."""
        state_path = self.folder / "state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state["job_id"] != self.job_id or state["format"] != self.fmt:
                raise FollowConflict(
                    f"{self.folder} holds the follow of job {state['job_id']} (format {state['format']}) "
                    f"into {self.output}: choose another -o, or remove that folder"
                )
            self.created = int(state["created"])
        else:
            self.folder.mkdir(exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            state = {"job_id": self.job_id, "format": self.fmt, "created": self.created}
            tmp.write_text(json.dumps(state))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, state_path)
            _fsync_folder(self.folder)
        for debris in self.folder.glob("*.tmp"):
            debris.unlink()

    def segments(self) -> list[Segment]:
        """Oldest first."""
        found = []
        for path in self.folder.iterdir():
            m = _SEGMENT.match(path.name)
            if m:
                found.append(Segment(int(m.group(1)), int(m.group(2)), path))
        return sorted(found, key=lambda s: s.seq)

    def last(self) -> list[SpoolLine]:
        """The lines of the newest level-0 segment: the only one whose results may still be in
        Redis (a segment's results are confirmed before the next segment is written)."""
        newest = [s for s in self.segments() if s.level == 0]
        if not newest:
            return []
        with open(newest[-1].path, encoding="utf-8", newline="\n") as fh:
            return [decode(raw) for raw in fh]

    def write(self, lines: Iterable[SpoolLine]) -> int:
        """A new level-0 segment of ``lines`` (sorted here), durable on return; returns lines."""
        ordered = sorted(lines, key=lambda ln: ln.index)
        if not ordered:
            return 0
        segs = self.segments()
        seq = segs[-1].seq + 1 if segs else 1
        self._write_segment(Segment(seq, 0, self.folder / f"seg-{seq:08d}-L0.jsonl"), ordered)
        return len(ordered)

    def _write_segment(self, seg: Segment, lines: Iterable[SpoolLine]) -> None:
        tmp = seg.path.with_name(seg.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(encode(line))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, seg.path)
        _fsync_folder(self.folder)

    # --- merging ---------------------------------------------------------------------------

    def compact(self, *, everything: bool = False) -> None:
        """Merge runs of :data:`FAN_IN` consecutive segments of one level into one of the next
        level, as long as there is such a run; with ``everything``, until at most
        :data:`FAN_IN` segments are left (what :meth:`lines` merges in one pass).
        Only consecutive segments are ever merged, so "a newer segment wins" keeps holding."""
        while True:
            segs = self.segments()
            if len(segs) <= 1 or (everything and len(segs) <= FAN_IN):
                return
            runs = [
                segs[i : i + FAN_IN]
                for i in range(len(segs) - FAN_IN + 1)
                if len({s.level for s in segs[i : i + FAN_IN]}) == 1
            ]
            if runs:
                group = min(runs, key=lambda run: run[0].level)  # the oldest run of the lowest level
            elif everything:
                group = segs[: min(FAN_IN, len(segs) - FAN_IN + 1)]  # the oldest ones
            else:
                return
            self._merge(group)

    def _merge(self, group: list[Segment]) -> None:
        """Replace ``group`` (consecutive segments) by one segment holding the newest line of
        each item, at the seq of the newest (so it stays older than every later segment)."""
        newest = group[-1]
        level = max(s.level for s in group) + 1
        target = Segment(newest.seq, level, self.folder / f"seg-{newest.seq:08d}-L{level}.jsonl")
        files = [open(s.path, encoding="utf-8", newline="\n") for s in group]  # noqa: SIM115
        try:
            self._write_segment(target, newest_per_item(files))
        finally:
            for fh in files:
                fh.close()
        # the merged segment is durable: its sources can go (a kill before this only leaves
        # older copies of the same lines, which the next merge drops)
        for s in group:
            if s.path != target.path:
                s.path.unlink()
        _fsync_folder(self.folder)

    def lines(self) -> Iterator[SpoolLine]:
        """Every spooled line in input order, each item once (the newest line of each), merged
        from at most :data:`FAN_IN` segments (:meth:`compact` with ``everything`` first)."""
        segs = self.segments()
        if len(segs) > FAN_IN:
            raise RuntimeError("compact the spool before reading it in order")
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(s.path, encoding="utf-8", newline="\n")) for s in segs]
            yield from newest_per_item(files)

    def remove(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


def newest_per_item(files: Sequence[Iterable[str]]) -> Iterator[SpoolLine]:
    """The k-way merge of sorted segments (oldest first), the newest line of each item."""
    streams = [_keyed(n, fh) for n, fh in enumerate(files)]
    for _index, group in itertools.groupby(heapq.merge(*streams), key=lambda t: t[0]):
        *_, last = group
        yield last[2]


def _keyed(n: int, fh: Iterable[str]) -> Iterator[tuple[int, int, SpoolLine]]:
    """Segment ``n``'s lines as ``(index, n, line)``: ties between segments go to the newest."""
    for raw in fh:
        line = decode(raw)
        yield line.index, n, line


def render(
    lines: Iterable[SpoolLine], output: Path, errors: Path | None, *, include_unfinished: bool
) -> tuple[int, int, int]:
    """Write the output (and errors file) from spooled lines, atomically as `genq collect`
    does; returns (rows in ``output``, rows in ``errors``, never-run items left out)."""
    targets = [output] + ([errors] if errors is not None else [])
    for target in targets:
        check_output_path(target)
    counts = [0, 0, 0]
    with replaced_together(targets) as fhs:
        for line in lines:
            if line.kind == "n" and not include_unfinished:
                counts[2] += 1
                continue
            which = 1 if errors is not None and line.kind != "o" else 0
            fhs[which].write(line.row)
            counts[which] += 1
    return counts[0], counts[1], counts[2]
