"""Input problems in plain words: one :class:`Problem` per bad line, pydantic's errors translated,
values described the way a JSON user reads them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from pydantic import ValidationError


class Problem(Exception):
    """One thing wrong with a line: plain-words ``detail`` and the ``field`` path, if any."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


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
) -> Problem:
    """Turn the first pydantic error into one :class:`Problem` naming the field path, in the
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
        words += f", got {describe(first['input'])}"
    return Problem(safe(words), safe(path) or None)


def describe(value: object) -> str:
    """A short, JSON-flavoured description of a value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= 30 else text[:27] + '...'}"
    if isinstance(value, str):
        return f"the string {show(value)}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def show(text: str, limit: int = 40) -> str:
    """Quote a string for a message: shortened, and safe to encode as UTF-8."""
    short = text if len(text) <= limit else text[: limit - 3] + "..."
    return json.dumps(safe(short), ensure_ascii=False)


def safe(text: str) -> str:
    """Escape unpaired surrogates so the text can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
