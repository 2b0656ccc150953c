"""Reading a whole input, streamed: items in order, ids unique, the skip-invalid policy applied."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from producer.ids import IdIndex
from producer.inputs.anthropic import anthropic_fields
from producer.inputs.checks import Fields, InputLimits, check_id
from producer.inputs.lines import parse_line, read_lines
from producer.inputs.native import native_fields
from producer.inputs.openai import AZURE_URLS, OPENAI_KEYS, RESPONSES_URL, azure_fields, openai_fields
from producer.inputs.responses import responses_fields
from producer.inputs.words import Problem, describe, safe, show, translate
from worker.core.errors import InputError
from worker.core.schema import Api, ErrorInfo, Item

InputFormat = Literal["native", "openai", "azure", "responses", "anthropic"]
"""A file's dialect: one per file."""

FORMAT_NAMES: Mapping[str, str] = {
    "native": "native",
    "openai": "OpenAI batch",
    "azure": "Azure OpenAI batch",
    "responses": "OpenAI Responses batch",
    "anthropic": "Anthropic Message Batches",
}

READERS: Mapping[str, Callable[[Mapping[Any, Any], InputLimits], Fields]] = {
    "native": native_fields,
    "openai": openai_fields,
    "azure": azure_fields,
    "responses": responses_fields,
    "anthropic": anthropic_fields,
}

FILE_OUTPUT: Mapping[str, str] = {
    "native": "native",
    "openai": "openai",
    "azure": "openai",
    "responses": "openai",
    "anthropic": "anthropic",
}
"""``--format auto`` for a whole file of one dialect: the output shape of its lines."""

ERROR_API: Mapping[str, Api] = {
    "openai": "chat",
    "azure": "chat",
    "responses": "responses",
    "anthropic": "anthropic",
}
"""The API whose shape an invalid line of a dialect is answered in (``--skip-invalid``)."""


@dataclass
class ReadResult:
    """What was read: items in input order, the detected format and the errors of skipped lines."""

    items: list[Item]
    format: InputFormat
    invalid: list[InputError] = field(default_factory=list)
    """Errors of lines recorded as invalid items (only ever non-empty with ``skip_invalid``)."""


def stream_items(
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    limits: InputLimits = InputLimits(),
) -> ItemStream:
    """Validated items of a JSONL file, one at a time, in input order (memory stays flat: about
    12 bytes an item for duplicate detection).  Iterating raises :class:`InputError` for the
    first bad line (unless ``skip_invalid``), for a file that cannot be read, and, at the end,
    for a file without any item."""
    source = safe(os.fspath(path))
    return ItemStream(_Collector(source, skip_invalid, limits), _file_lines(path, source, limits))


def stream_records(
    records: Iterable[Mapping[str, Any]],
    *,
    skip_invalid: bool = False,
    limits: InputLimits = InputLimits(),
    source: str = "<records>",
) -> ItemStream:
    """Validated items of records given as dicts (the Python API); ``line`` is the 1-based
    position of the record."""
    collector = _Collector(safe(source), skip_invalid, limits)
    return ItemStream(collector, ((n, record, False) for n, record in enumerate(records, start=1)))


def read_items(
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    limits: InputLimits = InputLimits(),
) -> ReadResult:
    """Read and validate a whole JSONL file into memory (see :func:`stream_items`)."""
    return stream_items(path, skip_invalid=skip_invalid, limits=limits).read()


def items_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    skip_invalid: bool = False,
    limits: InputLimits = InputLimits(),
    source: str = "<records>",
) -> ReadResult:
    """Validate records given as dicts into memory (see :func:`stream_records`)."""
    return stream_records(records, skip_invalid=skip_invalid, limits=limits, source=source).read()


class ItemStream:
    """Items in input order; :attr:`format` and :attr:`invalid` fill in as it is read."""

    def __init__(self, collector: _Collector, lines: Iterator[tuple[int, object, bool]]) -> None:
        self._collector = collector
        self._lines = lines

    @property
    def format(self) -> InputFormat:
        return self._collector.format or "native"

    @property
    def invalid(self) -> list[InputError]:
        return self._collector.invalid

    @property
    def count(self) -> int:
        """Items yielded so far."""
        return self._collector.count

    def __iter__(self) -> Iterator[Item]:
        collector = self._collector
        for n, content, raw in self._lines:
            item = collector.add_line(n, content) if raw else collector.add_record(n, content)  # type: ignore[arg-type]
            if item is not None:
                yield item
        if not collector.count:
            raise InputError("no items", source=collector.source)

    def read(self) -> ReadResult:
        items = list(self)
        return ReadResult(items=items, format=self.format, invalid=self.invalid)


def _file_lines(
    path: str | os.PathLike[str], source: str, limits: InputLimits
) -> Iterator[tuple[int, object, bool]]:
    try:
        with open(path, "rb") as fh:
            for n, content in read_lines(fh, limits.max_line_bytes):
                yield n, content, True
    except FileNotFoundError:
        raise InputError("file not found", source=source) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a JSONL file", source=source) from None
    except PermissionError:
        raise InputError("permission denied", source=source) from None
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror or exc}", source=source) from None


class _Collector:
    """Validates items in order, keeps ids unique and applies the skip-invalid policy."""

    MAX_KEPT_ERRORS = 1000
    """Errors of skipped lines kept for the report (all of them are recorded as items)."""

    def __init__(self, source: str, skip_invalid: bool, limits: InputLimits) -> None:
        self.source = source
        self.skip_invalid = skip_invalid
        self.limits = limits
        self.count = 0
        self.invalid: list[InputError] = []
        self.invalid_count = 0
        self.format: InputFormat | None = None
        self.format_line = 0
        self.seen = IdIndex()

    def add_line(self, n: int, content: bytes | None) -> Item | None:
        if content is not None and not content.strip():
            return None
        try:
            if content is None:
                raise Problem(f"line is longer than {self.limits.max_line_bytes} bytes")
            record = parse_line(content)
        except Problem as problem:
            return self._reject(n, problem, None)
        return self.add_record(n, record)

    def add_record(self, n: int, record: object) -> Item:
        try:
            item = self._build(n, record)
        except Problem as problem:
            return self._reject(n, problem, record)
        self.count += 1
        self.seen.add(item.id, n)
        return item

    def _build(self, n: int, record: object) -> Item:
        if not isinstance(record, Mapping):
            raise Problem(f"must be a JSON object, not {describe(record)}")
        fmt = self._format_of(n, record)
        fields = READERS[fmt](record, self.limits)
        item_id = fields.id if fields.id is not None else f"line-{n}"
        earlier = self.seen.line_of(item_id)
        if earlier is not None:
            id_field = "id" if fmt == "native" else "custom_id"
            raise Problem(f"duplicate id {show(item_id)}: line {earlier} has the same id", id_field)
        try:
            return Item(
                index=self.count,
                id=item_id,
                line=n,
                prompt=fields.prompt,
                messages=fields.messages,
                params=fields.params,
                adapter=fields.adapter,
                api=fields.api,
            )
        except ValidationError as exc:  # pragma: no cover - everything was checked above
            raise translate(exc) from None

    def _format_of(self, n: int, record: Mapping[Any, Any]) -> InputFormat:
        fmt = _sniff(record)
        if self.format is None:
            self.format = fmt or "native"
            self.format_line = n
        elif fmt is not None and fmt != self.format:
            raise Problem(
                f"this line is in the {FORMAT_NAMES[fmt]} format but the input is in the "
                f"{FORMAT_NAMES[self.format]} format (decided by line {self.format_line}); "
                "do not mix formats in one file"
            )
        return self.format

    def _reject(self, n: int, problem: Problem, record: object) -> Item:
        error = InputError(problem.detail, line=n, field=problem.field, source=self.source)
        if not self.skip_invalid:
            raise error from None
        item_id = self._unique_id(_readable_id(record), n)
        where = f"line {n}" + (f", field '{problem.field}'" if problem.field else "")
        info = ErrorInfo(type=error.code, message=f"{where}: {problem.detail}")
        api = ERROR_API.get(self.format) if self.format else None
        item = Item(index=self.count, id=item_id, line=n, invalid=info, api=api)
        self.count += 1
        self.seen.add(item_id, n)
        self.invalid_count += 1
        if len(self.invalid) < self.MAX_KEPT_ERRORS:
            self.invalid.append(error)
        return item

    def _unique_id(self, preferred: str | None, n: int) -> str:
        if preferred is not None and self.seen.line_of(preferred) is None:
            return preferred
        candidate, k = f"line-{n}", 1
        while self.seen.line_of(candidate) is not None:
            k += 1
            candidate = f"line-{n}-{k}"
        return candidate


def _sniff(record: Mapping[Any, Any]) -> InputFormat | None:
    """The dialect a line is written in (None: it cannot tell).  A native line names its item by
    ``id``, an Anthropic request never does: a native line with a stray ``params`` is a bad native
    line, not an Anthropic file (which would make every other line a mix of formats)."""
    if "params" in record and "id" not in record:
        return "anthropic"
    if not OPENAI_KEYS.isdisjoint(record):
        url = record.get("url")
        if url == RESPONSES_URL:
            return "responses"
        return "azure" if isinstance(url, str) and url in AZURE_URLS else "openai"
    if "prompt" in record or "messages" in record:
        return "native"
    return None


def _readable_id(record: object) -> str | None:
    """The id an invalid line asked for, when it is a usable one."""
    if not isinstance(record, Mapping):
        return None
    for key in ("custom_id", "id"):
        value = record.get(key)
        if value is not None:
            try:
                return check_id(value, key)
            except Problem:
                return None
    return None
