"""JSON schema → grammar, the one definition shared by submit and the workers (no torch).

genq enforces ``response_format`` with llguidance (docs/BENCHMARKS.md, "Structured output",
says why).  Submit and the workers build the grammar here, with the same options, so a schema
that submit accepts is one every worker can enforce, and one it refuses never reaches a queue.

Options: compact JSON (``,`` and ``:`` with no whitespace between tokens).  Free whitespace
would let a model pad an answer with blanks until ``max_tokens`` ran out; compact JSON is also
the fewest tokens.  The answer is one JSON value and nothing after it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from worker.core.structured import ResponseFormat

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
"""llguidance's JSON compile options (applied over the schema's own ``x-guidance``)."""


def grammar_for(fmt: ResponseFormat) -> str:
    """The llguidance grammar (a JSON string) that enforces ``fmt``'s schema."""
    return _grammar(json.dumps(fmt.target_schema(), sort_keys=True, ensure_ascii=False))


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_OPTIONS)  # type: ignore[arg-type]


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` cannot be enforced (None: it can); see :func:`_schema_problem`.  Checked
    once per distinct schema (a file usually repeats a few)."""
    return _schema_problem(json.dumps(schema, sort_keys=True, ensure_ascii=False))


@functools.lru_cache(maxsize=1024)
def _schema_problem(schema_json: str) -> str | None:
    """Why ``schema`` cannot be enforced (None: it can): not a valid JSON Schema (checked against
    the 2020-12 meta-schema), or a feature the grammar compiler does not support (look-around in
    a ``pattern``, an unknown ``format``, ...).  The words come from jsonschema or llguidance."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from llguidance import LLMatcher

    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"is not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
    try:
        grammar = _grammar(schema_json)
    except ValueError as exc:
        return f"cannot be compiled: {exc}"
    error = LLMatcher.validate_grammar(grammar)
    if error:
        lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else error.strip()
        return f"cannot be enforced while decoding: {detail.removeprefix('error: ')}"
    return None
