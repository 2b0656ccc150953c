"""Checks shared by both input formats: known keys, ids, prompts, messages, generation parameters."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.inputs.requests import check_request, split_response_format
from producer.inputs.words import Problem, describe, safe, show, translate
from worker.core.schema import MAX_ID_LENGTH, Api, GenParams, Message

KNOWN_TYPOS: Mapping[str, str] = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "text": "prompt",
    "input": "prompt",
}


@dataclass(frozen=True)
class InputLimits:
    """Limits applied while reading."""

    max_new_tokens: int | None = None
    """The profile's hard limit on ``max_new_tokens``; ``None`` leaves it unchecked."""

    max_line_bytes: int = 1_048_576
    """Longest accepted line, in bytes without the line ending; checked before decoding."""

    max_n: int | None = None
    """The profile's limit on ``n`` (samples per item); ``None`` leaves it unchecked."""

    adapters: tuple[str, ...] | None = None
    """The adapters the profile lists, by name; an item may name only these.  ``None`` leaves
    ``adapter`` unchecked."""

    adapter: str | None = None
    """The job's adapter (``--adapter``): items that name none get it."""


@dataclass(frozen=True)
class Fields:
    """What a line asks for, whatever its format."""

    id: str | None
    prompt: str | None
    messages: list[Message] | None
    params: GenParams
    adapter: str | None = None
    api: Api | None = None
    """The hosted API the line was written for (None: native)."""


def check_keys(record: Mapping[Any, Any], allowed: frozenset[str], *, prefix: str) -> None:
    if allowed.issuperset(record):
        return
    for key in record:
        if key not in allowed:
            name = safe(str(key))
            hint = KNOWN_TYPOS.get(name) if isinstance(key, str) else None
            if hint is None or hint not in allowed:
                close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.75)
                hint = close[0] if close else None
            suggestion = f"; did you mean '{hint}'?" if hint else ""
            raise Problem(
                f"unknown field{suggestion} (allowed: {', '.join(sorted(allowed))})", f"{prefix}{name}"
            )


def check_adapter(value: object, limits: InputLimits, field_name: str) -> str | None:
    """An item's ``adapter``: a name the profile lists (the job's ``--adapter`` when unset)."""
    if value is None:
        return limits.adapter
    if not isinstance(value, str):
        raise Problem(f"must be the name of one of the profile's adapters, not {describe(value)}", field_name)
    known = limits.adapters
    if known is not None and value not in known:
        listed = ", ".join(show(a) for a in known) if known else "none (it has no adapter)"
        raise Problem(f"unknown adapter {show(safe(value))}: the profile lists {listed}", field_name)
    return value


def check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise Problem(f"must be a string, not {describe(value)}", field_name)
    if not value:
        raise Problem("must not be empty", field_name)
    if len(value) > MAX_ID_LENGTH:
        raise Problem(f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}", field_name)
    return check_text(value, field_name)


def check_text(value: str, field_name: str) -> str:
    """Refuse strings that cannot be written back as UTF-8 (unpaired surrogate escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        raise Problem(
            f"contains an unpaired surrogate escape (\\u{code:04x}) at character {exc.start + 1}",
            field_name,
        ) from None
    return value


def check_prompt(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise Problem(f"must be a string, not {describe(value)}", field_name)
    if not value.strip():
        raise Problem("must not be empty or only whitespace", field_name)
    return check_text(value, field_name)


def check_messages(value: object, field_name: str, *, allow_parts: bool) -> list[Message]:
    if not isinstance(value, list | tuple):
        raise Problem(f"must be a list of messages, not {describe(value)}", field_name)
    if not value:
        raise Problem("must not be empty", field_name)
    messages = [
        check_message(raw, f"{field_name}[{i}]", allow_parts=allow_parts) for i, raw in enumerate(value)
    ]
    if not any(m.role == "user" for m in messages):
        raise Problem("needs at least one message with role 'user'", field_name)
    return messages


def check_message(raw: object, field_name: str, *, allow_parts: bool) -> Message:
    """One chat message; ``allow_parts``: the hosted APIs' forms too (the ``developer`` role read
    as ``system``).  Content given as a list of text parts is joined in every format."""
    if not isinstance(raw, Mapping):
        raise Problem(f"must be an object with 'role' and 'content', not {describe(raw)}", field_name)
    data = dict(raw)
    if allow_parts and data.get("role") == "developer":
        data["role"] = "system"
    if isinstance(data.get("content"), list):
        data["content"] = join_text_parts(data["content"], f"{field_name}.content")
    try:
        message = Message.model_validate(data)
    except ValidationError as exc:
        raise translate(exc, prefix=f"{field_name}.") from None
    check_text(message.content, f"{field_name}.content")
    return message


TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
"""Text content parts: chat and Anthropic (``text``), Responses input (``input_text``) and an
earlier answer fed back (``output_text``)."""
MEDIA_PART_TYPES = frozenset(
    {"image_url", "image", "input_image", "input_audio", "input_file", "file", "document", "audio"}
)


def join_text_parts(parts: list[Any], field_name: str) -> str:
    """Content parts → one string, joined with newlines; only text parts (``{"type": "text",
    "text": str}`` and the Responses API's ``input_text``/``output_text``)."""
    if not parts:
        raise Problem("must not be an empty list of content parts", field_name)
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in MEDIA_PART_TYPES:
            raise Problem(
                f"only text content parts are supported, got a {safe(str(kind))} part "
                "(genq runs a text model)",
                f"{field_name}[{i}]",
            )
        if not (isinstance(part, Mapping) and kind in TEXT_PART_TYPES and isinstance(part.get("text"), str)):
            raise Problem(
                'only text content parts ({"type": "text", "text": "..."}) are supported, '
                f"got {describe(part)}",
                f"{field_name}[{i}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


NO_PARAMS = GenParams()


_PARAMS_CACHE: dict[tuple[tuple[str, type, Any], ...], GenParams] = {}
PARAMS_CACHE_SIZE = 4096
"""Distinct parameter sets kept validated: files mostly repeat a few, and pydantic's validation
is the largest cost of reading a line."""


def _params_key(raw: dict[str, Any]) -> tuple[tuple[str, type, Any], ...] | None:
    """A hashable key for ``raw`` that tells 1 from 1.0 from true; None when a value is not a
    plain scalar or a list of strings."""
    key = []
    for name, value in raw.items():
        if isinstance(value, list):
            if not all(type(v) is str for v in value):
                return None
            value = tuple(value)
        elif not isinstance(value, str | int | float | bool):
            return None
        key.append((name, type(value), value))
    return tuple(sorted(key, key=lambda t: t[0]))


def check_params(raw: dict[str, Any], limits: InputLimits, name_of: Callable[[str], str]) -> GenParams:
    """Validate generation parameters; ``name_of`` maps a GenParams field to its field path."""
    if not raw:
        return NO_PARAMS
    raw = dict(raw)
    response_format = split_response_format(raw, name_of)
    key = _params_key(raw)
    params = _PARAMS_CACHE.get(key) if key is not None else None
    if params is None:
        try:
            params = GenParams(**raw)
        except ValidationError as exc:
            raise translate(exc, rename=name_of) from None
        if key is not None and len(_PARAMS_CACHE) < PARAMS_CACHE_SIZE:
            _PARAMS_CACHE[key] = params
    if response_format is not None:
        params = params.model_copy(update={"response_format": response_format})
    check_request(params, limits.max_n, name_of)
    cap = limits.max_new_tokens
    if cap is not None and params.max_new_tokens is not None and params.max_new_tokens > cap:
        raise Problem(
            f"must be at most {cap} (the profile's limit), got {params.max_new_tokens}",
            name_of("max_new_tokens"),
        )
    for i, stop in enumerate(params.stop or ()):
        check_text(stop, f"{name_of('stop')}[{i}]")
    return params
