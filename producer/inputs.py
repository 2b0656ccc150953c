"""Reading job inputs: JSONL in the native or the OpenAI batch format, with line-numbered errors.

Two entry points share one validator:

* :func:`read_items` streams a file in binary, line by line (memory grows with the items, never
  with a copy of the whole file), and
* :func:`items_from_records` takes dicts from the Python API; there "line" is the 1-based
  position of the record.

The whole input is validated before anything is returned.  Without ``skip_invalid`` the first bad
line raises :class:`~worker.core.errors.InputError` naming the source, the line and the field, so a
caller can guarantee that nothing is enqueued.  With ``skip_invalid`` each bad line becomes an
:class:`~worker.core.schema.Item` whose ``invalid`` is set (recorded as errored, never generated) and
its error is listed in :attr:`ReadResult.invalid`.

Decisions worth knowing:

* The format is decided by the first line that holds a JSON object; a later line that is clearly
  of the other format is an error.  A line is "OpenAI" when it has any of ``custom_id``,
  ``method``, ``url`` or ``body`` and "native" when it has ``prompt`` or ``messages``.
* Blank (whitespace-only) lines are skipped; they still count for line numbers, not for indices.
* One UTF-8 byte-order mark at the very start of the file is stripped; anywhere else it is
  invalid JSON.  ``NaN``/``Infinity``, duplicate keys in one object and unpaired surrogate escapes
  (``"\\ud800"``, which cannot be written back as UTF-8) are refused.
* ``null`` for an optional field means "not set".
* Every item id is unique.  An invalid line keeps its own id when it is readable and unused;
  otherwise it gets ``line-<n>`` (made unique if a real id already took that name).
* OpenAI chat messages may use the ``developer`` role (read as ``system``) and text-only content
  parts (joined with newlines); native lines must use plain strings.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal, NoReturn

from pydantic import ValidationError

from producer.ids import IdIndex
from worker.core.errors import InputError
from worker.core.schema import MAX_ID_LENGTH, PARAM_FIELDS, ErrorInfo, GenParams, Item, Message

__all__ = [
    "InputFormat",
    "InputLimits",
    "ItemStream",
    "ReadResult",
    "items_from_records",
    "read_items",
    "stream_items",
    "stream_records",
]

InputFormat = Literal["native", "openai"]

UTF8_BOM = b"\xef\xbb\xbf"
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

NATIVE_KEYS: frozenset[str] = frozenset({"id", "prompt", "messages", "metadata", *PARAM_FIELDS})
OPENAI_KEYS: frozenset[str] = frozenset({"custom_id", "method", "url", "body"})

BODY_PARAMS: Mapping[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
}
"""OpenAI body key → GenParams field."""

BODY_IGNORED: frozenset[str] = frozenset({"model", "user", "metadata"})
"""Body keys that do not change what is generated (the worker's profile decides the model)."""

KNOWN_TYPOS: Mapping[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "text": "prompt",
    "input": "prompt",
}

_FORMAT_NAMES: Mapping[str, str] = {"native": "native", "openai": "OpenAI batch"}


@dataclass(frozen=True)
class InputLimits:
    """Limits applied while reading."""

    max_new_tokens: int | None = None
    """The profile's hard limit on ``max_new_tokens``; ``None`` leaves it unchecked."""

    max_line_bytes: int = 1_048_576
    """Longest accepted line, in bytes without the line ending; checked before decoding."""


@dataclass
class ReadResult:
    """What was read: items in input order, the detected format and the errors of skipped lines."""

    items: list[Item]
    format: InputFormat
    invalid: list[InputError] = field(default_factory=list)
    """Errors of lines recorded as invalid items (only ever non-empty with ``skip_invalid``)."""


# --- public entry points -------------------------------------------------------------------


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
    source = _safe(os.fspath(path))
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
    collector = _Collector(_safe(source), skip_invalid, limits)
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
            for n, content in _lines(fh, limits.max_line_bytes):
                yield n, content, True
    except FileNotFoundError:
        raise InputError("file not found", source=source) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a JSONL file", source=source) from None
    except PermissionError:
        raise InputError("permission denied", source=source) from None
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror or exc}", source=source) from None


# --- reading lines -------------------------------------------------------------------------


def _lines(fh: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
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


class _Problem(Exception):
    """One thing wrong with a line: plain-words ``detail`` and the ``field`` path, if any."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


def _reject_constant(name: str) -> NoReturn:
    raise _Problem(f"invalid JSON: {name} is not a valid JSON number")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Problem(f"invalid JSON: key {_show(key)} appears twice in one object", _safe(key))
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)


def _parse_line(content: bytes) -> Any:
    """Decode and parse one non-blank line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = content[exc.start]
        raise _Problem(f"not valid UTF-8 (byte 0x{bad:02x} at byte {exc.start + 1})") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _Problem(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise _Problem("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise _Problem(f"invalid JSON: {_safe(str(exc))}") from None


# --- the validator -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    id: str | None
    prompt: str | None
    messages: list[Message] | None
    params: GenParams


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
                raise _Problem(f"line is longer than {self.limits.max_line_bytes} bytes")
            record = _parse_line(content)
        except _Problem as problem:
            return self._reject(n, problem, None)
        return self.add_record(n, record)

    def add_record(self, n: int, record: object) -> Item:
        try:
            item = self._build(n, record)
        except _Problem as problem:
            return self._reject(n, problem, record)
        self.count += 1
        self.seen.add(item.id, n)
        return item

    def _build(self, n: int, record: object) -> Item:
        if not isinstance(record, Mapping):
            raise _Problem(f"must be a JSON object, not {_describe(record)}")
        fmt = self._format_of(n, record)
        fields = _native(record, self.limits) if fmt == "native" else _openai(record, self.limits)
        item_id = fields.id if fields.id is not None else f"line-{n}"
        earlier = self.seen.line_of(item_id)
        if earlier is not None:
            id_field = "id" if fmt == "native" else "custom_id"
            raise _Problem(f"duplicate id {_show(item_id)}: line {earlier} has the same id", id_field)
        try:
            return Item(
                index=self.count,
                id=item_id,
                line=n,
                prompt=fields.prompt,
                messages=fields.messages,
                params=fields.params,
            )
        except ValidationError as exc:  # pragma: no cover - everything was checked above
            raise translate(exc) from None

    def _format_of(self, n: int, record: Mapping[Any, Any]) -> InputFormat:
        fmt = _sniff(record)
        if self.format is None:
            self.format = fmt or "native"
            self.format_line = n
        elif fmt is not None and fmt != self.format:
            raise _Problem(
                f"this line is in the {_FORMAT_NAMES[fmt]} format but the input is in the "
                f"{_FORMAT_NAMES[self.format]} format (decided by line {self.format_line}); "
                "do not mix formats in one file"
            )
        return self.format

    def _reject(self, n: int, problem: _Problem, record: object) -> Item:
        error = InputError(problem.detail, line=n, field=problem.field, source=self.source)
        if not self.skip_invalid:
            raise error from None
        item_id = self._unique_id(_readable_id(record), n)
        where = f"line {n}" + (f", field '{problem.field}'" if problem.field else "")
        info = ErrorInfo(type=error.code, message=f"{where}: {problem.detail}")
        item = Item(index=self.count, id=item_id, line=n, invalid=info)
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
    if any(key in record for key in OPENAI_KEYS):
        return "openai"
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
                return _check_id(value, key)
            except _Problem:
                return None
    return None


# --- the native format ---------------------------------------------------------------------


def _native(record: Mapping[Any, Any], limits: InputLimits) -> _Fields:
    _check_keys(record, NATIVE_KEYS, prefix="")
    raw_id = record.get("id")
    item_id = None if raw_id is None else _check_id(raw_id, "id")
    prompt, messages = _prompt_or_messages(record)
    params = _params({k: record[k] for k in PARAM_FIELDS if k in record}, limits, lambda k: k)
    return _Fields(item_id, prompt, messages, params)


def _prompt_or_messages(record: Mapping[Any, Any]) -> tuple[str | None, list[Message] | None]:
    has_prompt = record.get("prompt") is not None
    has_messages = record.get("messages") is not None
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise _Problem(f"exactly one of 'prompt' and 'messages' is required, this line has {which}")
    if has_prompt:
        return _check_prompt(record["prompt"], "prompt"), None
    return None, _check_messages(record["messages"], "messages", allow_parts=False)


# --- the OpenAI batch format ---------------------------------------------------------------


def _openai(record: Mapping[Any, Any], limits: InputLimits) -> _Fields:
    _check_keys(record, OPENAI_KEYS, prefix="")
    if record.get("custom_id") is None:
        raise _Problem("is required (the id of the request)", "custom_id")
    item_id = _check_id(record["custom_id"], "custom_id")
    method = record.get("method", "POST")
    if method != "POST":
        raise _Problem(f'must be "POST", not {_describe(method)}', "method")
    url = record.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        got = "it is missing" if url is None else f"got {_describe(url)}"
        raise _Problem(f'must be "{CHAT_URL}" or "{COMPLETIONS_URL}"; {got}', "url")
    body = record.get("body")
    if not isinstance(body, Mapping):
        got = "it is missing" if body is None else f"got {_describe(body)}"
        raise _Problem(f"must be an object with the request; {got}", "body")
    prompt, messages = _openai_input(body, url)
    return _Fields(item_id, prompt, messages, _openai_params(body, limits))


def _openai_input(body: Mapping[Any, Any], url: str) -> tuple[str | None, list[Message] | None]:
    wanted, other = ("messages", "prompt") if url == CHAT_URL else ("prompt", "messages")
    if body.get(other) is not None:
        raise _Problem(f"is not part of a {url} request (use body.{wanted})", f"body.{other}")
    if body.get(wanted) is None:
        raise _Problem(f"is required for {url}", f"body.{wanted}")
    if url == CHAT_URL:
        return None, _check_messages(body["messages"], "body.messages", allow_parts=True)
    return _check_prompt(body["prompt"], "body.prompt"), None


def _openai_params(body: Mapping[Any, Any], limits: InputLimits) -> GenParams:
    raw: dict[str, Any] = {}
    source_key: dict[str, str] = {}
    for key, value in body.items():
        if key in ("messages", "prompt") or key in BODY_IGNORED or value is None:
            continue
        if key in BODY_PARAMS:
            name = BODY_PARAMS[key]
            if name in raw and raw[name] != value:
                raise _Problem(
                    f"conflicts with body.{source_key[name]} ({_describe(raw[name])})", f"body.{key}"
                )
            raw[name], source_key[name] = value, key
        elif key == "n":
            if type(value) is not int or value != 1:
                raise _Problem(f"only n = 1 is supported, got {_describe(value)}", "body.n")
        elif key == "stream":
            if value is not False:
                raise _Problem(
                    f"streaming is not supported in a batch, got {_describe(value)}", "body.stream"
                )
        else:
            raise _Problem(
                "is not supported by genq (refused rather than ignored, because it would change the result)",
                f"body.{_safe(str(key))}",
            )
    return _params(raw, limits, lambda name: f"body.{source_key.get(name, name)}")


# --- shared checks -------------------------------------------------------------------------


def _check_keys(record: Mapping[Any, Any], allowed: frozenset[str], *, prefix: str) -> None:
    if allowed.issuperset(record):
        return
    for key in record:
        if key not in allowed:
            name = _safe(str(key))
            hint = KNOWN_TYPOS.get(name) if isinstance(key, str) else None
            if hint is None or hint not in allowed:
                close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.75)
                hint = close[0] if close else None
            suggestion = f"; did you mean '{hint}'?" if hint else ""
            raise _Problem(
                f"unknown field{suggestion} (allowed: {', '.join(sorted(allowed))})", f"{prefix}{name}"
            )


def _check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise _Problem(f"must be a string, not {_describe(value)}", field_name)
    if not value:
        raise _Problem("must not be empty", field_name)
    if len(value) > MAX_ID_LENGTH:
        raise _Problem(f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}", field_name)
    return _check_text(value, field_name)


def _check_text(value: str, field_name: str) -> str:
    """Refuse strings that cannot be written back as UTF-8 (unpaired surrogate escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        raise _Problem(
            f"contains an unpaired surrogate escape (\\u{code:04x}) at character {exc.start + 1}",
            field_name,
        ) from None
    return value


def _check_prompt(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise _Problem(f"must be a string, not {_describe(value)}", field_name)
    if not value.strip():
        raise _Problem("must not be empty or only whitespace", field_name)
    return _check_text(value, field_name)


def _check_messages(value: object, field_name: str, *, allow_parts: bool) -> list[Message]:
    if not isinstance(value, list | tuple):
        raise _Problem(f"must be a list of messages, not {_describe(value)}", field_name)
    if not value:
        raise _Problem("must not be empty", field_name)
    messages = [
        _check_message(raw, f"{field_name}[{i}]", allow_parts=allow_parts) for i, raw in enumerate(value)
    ]
    if not any(m.role == "user" for m in messages):
        raise _Problem("needs at least one message with role 'user'", field_name)
    return messages


def _check_message(raw: object, field_name: str, *, allow_parts: bool) -> Message:
    if not isinstance(raw, Mapping):
        raise _Problem(f"must be an object with 'role' and 'content', not {_describe(raw)}", field_name)
    data = dict(raw)
    if allow_parts:
        if data.get("role") == "developer":
            data["role"] = "system"
        if isinstance(data.get("content"), list):
            data["content"] = _join_text_parts(data["content"], f"{field_name}.content")
    try:
        message = Message.model_validate(data)
    except ValidationError as exc:
        raise translate(exc, prefix=f"{field_name}.") from None
    _check_text(message.content, f"{field_name}.content")
    return message


def _join_text_parts(parts: list[Any], field_name: str) -> str:
    """OpenAI content parts → one string; only ``{"type": "text", "text": str}`` parts."""
    texts = []
    for i, part in enumerate(parts):
        if not (
            isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ):
            raise _Problem(
                'only text content parts ({"type": "text", "text": "..."}) are supported, '
                f"got {_describe(part)}",
                f"{field_name}[{i}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


_NO_PARAMS = GenParams()


def _params(raw: dict[str, Any], limits: InputLimits, name_of: Callable[[str], str]) -> GenParams:
    """Validate generation parameters; ``name_of`` maps a GenParams field to its field path."""
    if not raw:
        return _NO_PARAMS
    try:
        params = GenParams(**raw)
    except ValidationError as exc:
        raise translate(exc, rename=name_of) from None
    cap = limits.max_new_tokens
    if cap is not None and params.max_new_tokens is not None and params.max_new_tokens > cap:
        raise _Problem(
            f"must be at most {cap} (the profile's limit), got {params.max_new_tokens}",
            name_of("max_new_tokens"),
        )
    for i, stop in enumerate(params.stop or ()):
        _check_text(stop, f"{name_of('stop')}[{i}]")
    return params


# --- pydantic errors in plain words --------------------------------------------------------

_TYPE_WORDS: Mapping[str, str] = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "bool_type": "must be true or false",
    "missing": "is required",
    "extra_forbidden": "is not an allowed field",
}


def translate(
    exc: ValidationError, *, prefix: str = "", rename: Callable[[str], str] = lambda k: k
) -> _Problem:
    """Turn the first pydantic error into one :class:`_Problem` naming the field path, in the
    plain words every input error uses (never pydantic's own "Input should be ..." wording)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = first["loc"]
    head = str(loc[0]) if loc else ""
    path = prefix + rename(head) + "".join(f"[{part}]" for part in loc[1:] if isinstance(part, int))
    same_field = {e["type"] for e in errors if e["loc"][:1] == loc[:1]}
    kind = first["type"]
    if same_field == {"float_type", "int_type"}:
        words = "must be a number"
    elif head == "stop" and kind == "list_type":
        words = "must be a string or a list of strings"
    elif kind == "value_error":
        words = str(first.get("ctx", {}).get("error", first["msg"]))
    elif kind == "literal_error":
        words = f"must be one of {first.get('ctx', {}).get('expected', '?')}"
    else:
        words = _TYPE_WORDS.get(kind) or first["msg"].replace("Input should be", "must be")
    if kind not in ("missing", "extra_forbidden"):
        words += f", got {_describe(first['input'])}"
    return _Problem(_safe(words), _safe(path) or None)


def _describe(value: object) -> str:
    """A short, JSON-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= 30 else text[:27] + '...'}"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _show(text: str, limit: int = 40) -> str:
    """Quote a string for a message: shortened, and safe to encode as UTF-8."""
    short = text if len(text) <= limit else text[: limit - 3] + "..."
    return json.dumps(_safe(short), ensure_ascii=False)


def _safe(text: str) -> str:
    """Escape unpaired surrogates so the text can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
