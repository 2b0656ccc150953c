"""The native input format: ``{"id", "prompt" | "messages", generation parameters...}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.inputs.checks import (
    Fields,
    InputLimits,
    check_adapter,
    check_id,
    check_keys,
    check_messages,
    check_params,
    check_prompt,
)
from producer.inputs.words import Problem
from worker.core.schema import PARAM_FIELDS, Message

NATIVE_KEYS: frozenset[str] = frozenset({"id", "prompt", "messages", "metadata", "adapter", *PARAM_FIELDS})


def native_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    check_keys(record, NATIVE_KEYS, prefix="")
    raw_id = record.get("id")
    item_id = None if raw_id is None else check_id(raw_id, "id")
    prompt, messages = _prompt_or_messages(record)
    params = check_params({k: record[k] for k in PARAM_FIELDS if k in record}, limits, lambda k: k)
    adapter = check_adapter(record.get("adapter"), limits, "adapter")
    return Fields(item_id, prompt, messages, params, adapter)


def _prompt_or_messages(record: Mapping[Any, Any]) -> tuple[str | None, list[Message] | None]:
    has_prompt = record.get("prompt") is not None
    has_messages = record.get("messages") is not None
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise Problem(f"exactly one of 'prompt' and 'messages' is required, this line has {which}")
    if has_prompt:
        return check_prompt(record["prompt"], "prompt"), None
    return None, check_messages(record["messages"], "messages", allow_parts=False)
