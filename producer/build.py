"""Building a job: its options, its id, its spec and its input, for `genq submit`, `genq run` with
a broker and the embedded `genq run` alike (one path: no command builds a job its own way).

* :func:`job_options`: the options, checked, with the profile loaded once;
* :class:`JobBuilder`: one job of one source (a file, or records from the Python API): its id
  (given, or derived from the file's bytes, the profile and the options: the same command finds
  the same job), its spec (:meth:`SubmitOptions.spec`) and its input, read through the one
  reader (:mod:`producer.inputs`), streamed: :meth:`JobBuilder.read` is one pass over the
  input, a page at a time, validating each line and adding it to the job's digest;
* :class:`EmbeddedJob`: what an embedded run (:mod:`worker.local`) reads: the input again from
  its start, a window at a time, as often as it needs, and the job's spec once it was read
  through.  Memory stays flat whatever the file's size (the reader keeps ~12 bytes an item to
  refuse a duplicate id).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from producer.inputs import FILE_OUTPUT, InputFormat, ItemStream, stream_items, stream_records
from producer.options import SubmitOptions, derived_job_id, input_limits, new_job_id, source_fingerprint
from worker.core.errors import InputError
from worker.core.identity import JobDigest, job_context
from worker.core.outputs import OutputFormat
from worker.core.profiles import Profile, load_profile
from worker.core.schema import GenParams, Item, JobSpec
from worker.core.settings import Settings
from worker.core.states import Priority, QueueMode

Source = str | os.PathLike[str] | Iterable[Mapping[str, Any]]
"""A JSONL file, or records (dicts) from the Python API."""


def job_options(
    profile: str | Path | Profile,
    *,
    settings: Settings | None = None,
    mode: QueueMode | str = QueueMode.ANY,
    chunk_size: int = 16,
    params: GenParams | None = None,
    system_prompt: str | None = None,
    expires_in: float | None = None,
    skip_invalid: bool = False,
    adapter: str | None = None,
    priority: Priority | str = Priority.NORMAL,
) -> SubmitOptions:
    """A job's options, checked (each error names its option); ``profile`` is loaded here, once,
    when given by name or path."""
    if mode not in tuple(QueueMode):
        raise InputError(f"unknown mode {mode!r}: choose any, nf4 or fp32", field="mode")
    if priority not in tuple(Priority):
        raise InputError(f"unknown priority {priority!r}: choose high, normal or low", field="priority")
    options = SubmitOptions(
        profile=profile if isinstance(profile, Profile) else load_profile(profile, settings),
        mode=QueueMode(mode),
        chunk_size=chunk_size,
        params=params or GenParams(),
        system_prompt=system_prompt,
        expires_in=expires_in,
        skip_invalid=skip_invalid,
        adapter=adapter,
        priority=Priority(priority),
    )
    options.check()
    return options


def is_file(source: Source) -> bool:
    return isinstance(source, str | os.PathLike)


class JobBuilder:
    """One job of ``source`` with ``options``: its id, its spec and its input."""

    def __init__(self, source: Source, options: SubmitOptions) -> None:
        self.source = source
        self.options = options

    @cached_property
    def fingerprint(self) -> str:
        """A file's bytes and the job's options, hashed (read once); "" for records."""
        return source_fingerprint(self.source, self.options) if is_file(self.source) else ""  # type: ignore[arg-type]

    def job_id(self, given: str | None = None, *, new: bool = False) -> str:
        """``given``; else, for a file, the id derived from its bytes and the options (``new``: a
        fresh one); records always get a fresh id."""
        if given is not None:
            return given
        if is_file(self.source) and not new:
            return derived_job_id(self.source, self.options, fingerprint=self.fingerprint)  # type: ignore[arg-type]
        return new_job_id()

    def spec(self, job_id: str, *, total: int, input_digest: str = "") -> JobSpec:
        return self.options.spec(
            job_id,
            total=total,
            input_digest=input_digest,
            source=os.fspath(self.source) if is_file(self.source) else None,  # type: ignore[arg-type]
            source_fingerprint=self.fingerprint,
        )

    def read(self) -> JobInput:
        """One pass over the input, from its start."""
        return JobInput(self.source, self.options)


@dataclass
class Page:
    """A page of validated items, in input order, and each one's stored form (``(index, JSON)``)."""

    items: list[Item]
    rows: list[tuple[int, str]]


class JobInput:
    """One pass over a job's input: pages of validated items (the first bad line raises
    :class:`InputError` naming line and field, unless ``skip_invalid``), and what the pass found:
    :attr:`count`, :attr:`format` and, once read through, :attr:`digest` (the job's)."""

    def __init__(self, source: Source, options: SubmitOptions) -> None:
        limits = input_limits(options.profile, options.adapter)
        if is_file(source):
            self._stream: ItemStream = stream_items(source, skip_invalid=options.skip_invalid, limits=limits)  # type: ignore[arg-type]
        else:
            self._stream = stream_records(source, skip_invalid=options.skip_invalid, limits=limits)  # type: ignore[arg-type]
        self._digest = JobDigest(job_context(options.profile, options.params, options.system_prompt))
        self.done = False

    @property
    def count(self) -> int:
        """Items read so far (all of them once :attr:`done`)."""
        return self._stream.count

    @property
    def format(self) -> InputFormat:
        """The input's dialect (decided by its first item)."""
        return self._stream.format

    @property
    def digest(self) -> str:
        """The job's digest: its context and every item, in order (complete once :attr:`done`)."""
        return self._digest.hexdigest()

    def pages(self, size: int) -> Iterator[Page]:
        """The input, ``size`` items at a time."""
        items: list[Item] = []
        for item in self._stream:
            items.append(item)
            if len(items) >= size:
                yield self._page(items)
                items = []
        if items:
            yield self._page(items)
        self.done = True

    def _page(self, items: list[Item]) -> Page:
        rows = [(item.index, item.model_dump_json(exclude_defaults=True)) for item in items]
        for _, raw in rows:
            self._digest.add(raw)
        return Page(items, rows)


class EmbeddedJob:
    """A job run embedded (:func:`worker.local.run_embedded`): its input, read again from its start
    for each pass, a window at a time (the run holds one window, never the file), and its spec,
    complete once the first pass read the input through (its total and digest).  A later pass that
    reads another input (the file changed during the run) stops the run in one line."""

    def __init__(self, build: JobBuilder, job_id: str, fmt: OutputFormat = "auto") -> None:
        self.build = build
        self.job_id = job_id
        self._fmt = fmt
        self._first: JobInput | None = None

    @cached_property
    def draft(self) -> JobSpec:
        """The spec before the input is read: total 0, no digest (its id, options and source)."""
        return self.build.spec(self.job_id, total=0)

    def windows(self, size: int) -> Iterator[list[Item]]:
        """The whole input from its start, validated, ``size`` items at a time."""
        reading = self.build.read()
        for page in reading.pages(size):
            yield page.items
        first = self._first
        if first is None:
            self._first = reading
        elif (reading.count, reading.digest) != (first.count, first.digest):
            raise InputError(
                "changed while genq run read it: run it again (what is written is kept)",
                source=str(self.build.source),
            )

    def _read(self) -> JobInput:
        if self._first is None:
            raise RuntimeError("the input has not been read through yet")
        return self._first

    def spec(self) -> JobSpec:
        reading = self._read()
        return self.build.spec(self.job_id, total=reading.count, input_digest=reading.digest)

    @property
    def output_format(self) -> OutputFormat:
        """The output's shape: as asked, or for ``auto`` the one of the file's dialect (one per file)."""
        if self._fmt != "auto":
            return self._fmt
        return FILE_OUTPUT[self._read().format]  # type: ignore[return-value]
