"""Anthropic Message Batches request lines: ``{"custom_id", "params": {"model", "max_tokens",
"system", "messages", "temperature", "top_p", "top_k", "stop_sequences", ...}}``.

``system`` is a string or a list of text blocks; message content a string or a list of content
blocks, of which genq takes text blocks only.  JSON output: Anthropic's structured outputs,
``output_config.format`` (``{"type": "json_schema", "schema": {...}}``) or the beta's
``output_format`` of the same shape, enforced while decoding like OpenAI's ``response_format``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.inputs.bodies import STREAM, TOOLS, BodyRules, read_params, require_object
from producer.inputs.checks import Fields, InputLimits, check_id, check_keys, check_message, check_messages
from producer.inputs.requests import check_json_schema
from producer.inputs.words import Problem, describe
from worker.core.schema import Message
from worker.core.structured import ResponseFormat

ANTHROPIC_KEYS: frozenset[str] = frozenset({"custom_id", "params"})

RULES = BodyRules(
    prefix="params.",
    params={
        "max_tokens": "max_new_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "stop_sequences": "stop",
    },
    ignored=frozenset({"model", "metadata", "service_tier", "thinking", "inference_geo"}),
    refused={
        "tools": TOOLS,
        "tool_choice": TOOLS,
        "mcp_servers": TOOLS,
        "container": "code execution containers are not supported by genq",
        "context_management": "genq never edits the conversation (a too long prompt is an error)",
        "stream": STREAM,
    },
    no_op={"tools": ([],), "mcp_servers": ([],), "stream": (False,)},
    read=frozenset({"messages", "system", "output_config", "output_format"}),
)

MESSAGE_KEYS = frozenset({"role", "content"})
TEXT_BLOCK_KEYS = frozenset({"type", "text", "cache_control", "citations"})
OUTPUT_CONFIG_KEYS = frozenset({"format", "effort"})
FORMAT_KEYS = frozenset({"type", "schema"})


def anthropic_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    check_keys(record, ANTHROPIC_KEYS, prefix="")
    if record.get("custom_id") is None:
        raise Problem("is required (the id of the request)", "custom_id")
    item_id = check_id(record["custom_id"], "custom_id")
    params = require_object(record.get("params"), "params", "the Messages API request")
    if params.get("max_tokens") is None:
        raise Problem("is required (Anthropic's Messages API requires it)", "params.max_tokens")
    messages = _system(params.get("system")) + _messages(params.get("messages"))
    converted: dict[str, tuple[object, str]] = {}
    response_format = _output_format(params)
    if response_format is not None:
        converted["response_format"] = response_format
    return Fields(
        item_id, None, messages, read_params(params, RULES, limits, converted), limits.adapter, "anthropic"
    )


def _messages(value: object) -> list[Message]:
    if value is None:
        raise Problem("is required (a list of user and assistant messages)", "params.messages")
    if not isinstance(value, list):
        raise Problem(f"must be a list of messages, not {describe(value)}", "params.messages")
    for i, raw in enumerate(value):
        if isinstance(raw, Mapping):
            check_keys(raw, MESSAGE_KEYS, prefix=f"params.messages[{i}].")
            if raw.get("role") not in ("user", "assistant"):
                raise Problem(
                    f'must be "user" or "assistant" (the system prompt goes in params.system), '
                    f"got {describe(raw.get('role'))}",
                    f"params.messages[{i}].role",
                )
    return check_messages(value, "params.messages", allow_parts=False)


def _system(value: object) -> list[Message]:
    """``system``: a string or a list of text blocks; empty when absent."""
    if value is None:
        return []
    if isinstance(value, list):
        for i, block in enumerate(value):
            if isinstance(block, Mapping) and block.get("type") == "text":
                check_keys(block, TEXT_BLOCK_KEYS, prefix=f"params.system[{i}].")
    elif not isinstance(value, str):
        raise Problem(f"must be a string or a list of text blocks, not {describe(value)}", "params.system")
    return [check_message({"role": "system", "content": value}, "params.system", allow_parts=False)]


def _output_format(params: Mapping[Any, Any]) -> tuple[ResponseFormat, str] | None:
    """``output_config.format`` (or the beta's ``output_format``) as a response format."""
    config, beta = params.get("output_config"), params.get("output_format")
    fmt, field = beta, "output_format"
    if config is not None:
        config = require_object(config, "params.output_config", '"format"')
        check_keys(config, OUTPUT_CONFIG_KEYS, prefix="params.output_config.")
        if config.get("format") is not None:
            if beta is not None:
                raise Problem(
                    "give the JSON format once: output_config.format or output_format", "params.output_format"
                )
            fmt, field = config["format"], "output_config.format"
    if fmt is None:
        return None
    path = f"params.{field}"
    fmt = require_object(fmt, path, '"type": "json_schema" and "schema"')
    check_keys(fmt, FORMAT_KEYS, prefix=f"{path}.")
    if fmt.get("type") != "json_schema":
        raise Problem(f'must be "json_schema", got {describe(fmt.get("type"))}', f"{path}.type")
    if fmt.get("schema") is None:
        raise Problem("is required (the JSON schema of the answer)", f"{path}.schema")
    spec = check_json_schema({"name": "output", "schema": fmt["schema"]}, path)
    return ResponseFormat(type="json_schema", json_schema=spec), field
