"""The request body of a hosted API's batch line, read by one set of rules per API: which keys map
to generation parameters, which are ignored (they do not change the answer), which are refused
with the reason (unless they hold their no-op value), and every other key refused by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.inputs.checks import InputLimits, check_params
from producer.inputs.words import Problem, describe, safe
from worker.core.schema import GenParams

TOOLS = "tool and function calls are not supported by genq"
STREAM = "streaming is not supported in a batch"


@dataclass(frozen=True)
class BodyRules:
    prefix: str
    """The field path of the body (``body.`` or ``params.``)."""
    params: Mapping[str, str]
    """Body key → GenParams field."""
    ignored: frozenset[str]
    """Keys that do not change what is generated (the worker's profile decides the model)."""
    refused: Mapping[str, str]
    """Keys refused with the reason, unless they hold one of their ``no_op`` values (or null)."""
    no_op: Mapping[str, tuple[object, ...]] = field(default_factory=dict)
    read: frozenset[str] = frozenset()
    """Keys the API's own reader handles (the prompt, the messages, a JSON format...)."""


def read_params(
    body: Mapping[Any, Any],
    rules: BodyRules,
    limits: InputLimits,
    converted: Mapping[str, tuple[object, str]] = {},
) -> GenParams:
    """The generation parameters of ``body``; ``converted`` holds those the API's reader already
    converted (GenParams field → (value, the body key it came from))."""
    raw: dict[str, Any] = {name: value for name, (value, _key) in converted.items()}
    source_key: dict[str, str] = {name: key for name, (_value, key) in converted.items()}
    for key, value in body.items():
        if key in rules.read or key in rules.ignored or value is None:
            continue
        if key in rules.refused:
            if any(type(value) is type(ok) and value == ok for ok in rules.no_op.get(key, ())):
                continue
            raise Problem(f"is not supported: {rules.refused[key]}", f"{rules.prefix}{key}")
        if key in rules.params:
            name = rules.params[key]
            if name in raw and raw[name] != value:
                raise Problem(
                    f"conflicts with {rules.prefix}{source_key[name]} ({describe(raw[name])})",
                    f"{rules.prefix}{key}",
                )
            raw[name], source_key[name] = value, key
        else:
            raise Problem(
                "is not supported by genq (refused rather than ignored, because it would change the result)",
                f"{rules.prefix}{safe(str(key))}",
            )
    return check_params(raw, limits, lambda name: f"{rules.prefix}{source_key.get(name, name)}")


def require_object(value: object, field_name: str, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        got = "it is missing" if value is None else f"got {describe(value)}"
        raise Problem(f"must be an object with {what}; {got}", field_name)
    return value
