"""Checks of the OpenAI request fields beyond plain sampling, for both input formats:
``response_format`` (its shape, then whether its schema can be enforced), ``n`` against the
profile's limit, ``top_logprobs`` only with ``logprobs``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from producer.inputs.words import Problem, describe, translate
from worker.core.grammar import schema_problem
from worker.core.schema import GenParams
from worker.core.structured import SCHEMA_NAME, JsonSchemaSpec, ResponseFormat

FORMAT_TYPES = ("text", "json_object", "json_schema")
SPEC_KEYS = ("description", "name", "schema", "strict")


def check_response_format(value: object, field: str) -> ResponseFormat:
    """``response_format`` as OpenAI defines it, its schema one genq can enforce; a problem names
    the exact field (``…response_format.json_schema.schema``) and the reason."""
    if not isinstance(value, Mapping):
        raise Problem(f'must be an object such as {{"type": "json_object"}}, not {describe(value)}', field)
    unknown = sorted(str(k) for k in value if k not in ("type", "json_schema"))
    if unknown:
        raise Problem("is not an allowed field (allowed: json_schema, type)", f"{field}.{unknown[0]}")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise Problem(
            f"must be one of {', '.join(map(repr, FORMAT_TYPES))}, got {describe(kind)}", f"{field}.type"
        )
    spec = value.get("json_schema")
    if kind != "json_schema":
        if spec is not None:
            raise Problem(f'is only allowed with "type": "json_schema", not {kind!r}', f"{field}.json_schema")
        return ResponseFormat(type=kind)
    return ResponseFormat(type="json_schema", json_schema=check_json_schema(spec, f"{field}.json_schema"))


def check_json_schema(spec: object, field: str) -> JsonSchemaSpec:
    """``{"name", "schema", "strict", "description"}`` (chat's ``response_format.json_schema``, the
    Responses API's ``text.format`` without its ``type``); a ``strict`` schema must say what
    OpenAI's strict mode needs (:func:`strict_problem`)."""
    if not isinstance(spec, Mapping):
        got = "it is missing" if spec is None else f"got {describe(spec)}"
        raise Problem(
            f'is required with "type": "json_schema" (an object with name and schema); {got}', field
        )
    unknown = sorted(str(k) for k in spec if k not in SPEC_KEYS)
    if unknown:
        raise Problem(f"is not an allowed field (allowed: {', '.join(SPEC_KEYS)})", f"{field}.{unknown[0]}")
    if spec.get("name") is None:
        raise Problem(
            f"is required (letters, digits, '_' or '-', at most 64: {SCHEMA_NAME})", f"{field}.name"
        )
    schema = spec.get("schema")
    if schema is not None:
        if not isinstance(schema, Mapping):
            raise Problem(f"must be a JSON Schema object, not {describe(schema)}", f"{field}.schema")
        problem = schema_problem(dict(schema))
        if problem is not None:
            raise Problem(problem, f"{field}.schema")
        if spec.get("strict") is True:
            found = strict_problem(schema, f"{field}.schema")
            if found is not None:
                raise Problem(*found)
    try:
        return JsonSchemaSpec.model_validate(dict(spec))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "string_pattern_mismatch":
            raise Problem(
                f"must be letters, digits, '_' or '-' (at most 64), got {describe(first['input'])}",
                f"{field}.{first['loc'][0]}",
            ) from None
        raise translate(exc, prefix=f"{field}.") from None


def strict_problem(schema: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """What a schema lacks for OpenAI's strict mode, as (reason, field path), or None.

    Strict mode means: the answer has exactly the properties the schema lists.  OpenAI refuses a
    strict schema whose objects do not say so, and so does genq (rather than silently tightening
    it): every object schema, at any depth, needs ``additionalProperties: false`` and every one
    of its properties in ``required``."""
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object:
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False:
            return (
                'strict mode needs "additionalProperties": false on every object (the answer has '
                'exactly the listed properties); add it, or set "strict": false',
                path,
            )
        required = schema.get("required") or []
        missing = [str(k) for k in properties if k not in required]
        if missing:
            return (
                f'strict mode needs every property in "required"; missing: {", ".join(missing)} (make an '
                'optional one nullable: {"type": ["string", "null"]}), or set "strict": false',
                path,
            )
    for key, value in schema.items():
        children: list[tuple[str, object]] = []
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, Mapping):
            children = [(f"{key}.{name}", sub) for name, sub in value.items()]
        elif key in ("items", "additionalProperties", "not", "contains") and isinstance(value, Mapping):
            children = [(key, value)]
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            children = [(f"{key}[{i}]", sub) for i, sub in enumerate(value)]
        for where, sub in children:
            if isinstance(sub, Mapping):
                found = strict_problem(sub, f"{path}.{where}")
                if found is not None:
                    return found
    return None


def check_request(params: GenParams, max_n: int | None, name_of: Callable[[str], str]) -> None:
    """What a valid GenParams may still get wrong: ``n`` above the profile's limit, and
    ``top_logprobs`` without ``logprobs``."""
    if max_n is not None and params.n is not None and params.n > max_n:
        raise Problem(
            f"must be at most {max_n} (the profile's limit on samples), got {params.n}", name_of("n")
        )
    if params.top_logprobs and not params.logprobs:
        raise Problem("needs logprobs: true", name_of("top_logprobs"))


def split_response_format(raw: dict[str, Any], name_of: Callable[[str], str]) -> ResponseFormat | None:
    """Take ``response_format`` out of ``raw`` and check it (None when absent)."""
    value = raw.pop("response_format", None)
    if value is None:
        return None
    if isinstance(value, ResponseFormat):
        return value
    return check_response_format(value, name_of("response_format"))
