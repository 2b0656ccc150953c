"""OpenAI Responses API batch lines: ``{"custom_id", "method", "url": "/v1/responses", "body":
{"input", "instructions", "max_output_tokens", "temperature", "top_p", "text": {"format"}}}``.

``input`` is a string (one user message) or a list of message items (``{"role", "content"}``,
optionally ``"type": "message"``; content a string or ``input_text``/``output_text`` parts);
``instructions`` becomes a system message in front of them.  ``text.format`` is the chat API's
``response_format`` with the ``json_schema`` fields one level up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.inputs.bodies import STREAM, TOOLS, BodyRules, read_params, require_object
from producer.inputs.checks import (
    Fields,
    InputLimits,
    check_keys,
    check_message,
    check_messages,
    check_prompt,
)
from producer.inputs.openai import BODY_IGNORED, RESPONSES_URL, batch_body
from producer.inputs.requests import check_json_schema, check_response_format
from producer.inputs.words import Problem, describe
from worker.core.schema import Api, Message
from worker.core.structured import ResponseFormat

URLS: Mapping[str, Api] = {RESPONSES_URL: "responses"}

RULES = BodyRules(
    prefix="body.",
    params={"max_output_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p"},
    ignored=BODY_IGNORED | {"reasoning", "prompt_cache_retention"},
    refused={
        "tools": TOOLS,
        "tool_choice": TOOLS,
        "parallel_tool_calls": TOOLS,
        "max_tool_calls": TOOLS,
        "stream": STREAM,
        "stream_options": STREAM,
        "background": "a batch line runs in the batch; background mode has no meaning here",
        "previous_response_id": "genq keeps no conversation state: send the whole conversation in input",
        "conversation": "genq keeps no conversation state: send the whole conversation in input",
        "prompt": "stored prompt templates live on OpenAI's servers, not here",
        "include": "extra output (logprobs, reasoning) in the Responses shape is not supported by genq",
        "top_logprobs": "logprobs in the Responses shape are not supported (use /v1/chat/completions)",
        "truncation": "genq never drops part of the input: a prompt longer than the context is an error",
    },
    no_op={
        "tools": ([],),
        "tool_choice": ("none", "auto"),
        "parallel_tool_calls": (True, False),
        "stream": (False,),
        "background": (False,),
        "include": ([],),
        "top_logprobs": (0,),
        "truncation": ("disabled",),
    },
    read=frozenset({"input", "instructions", "text"}),
)

MESSAGE_ITEM_KEYS = frozenset({"type", "role", "content", "id", "status"})
"""A message item of ``input``: an earlier answer fed back carries its ``id`` and ``status``."""
TEXT_KEYS = frozenset({"format", "verbosity"})
FORMAT_KEYS = frozenset({"type", "name", "schema", "strict", "description"})


def responses_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    item_id, _url, body = batch_body(record, URLS)
    messages = _input(body)
    converted: dict[str, tuple[object, str]] = {}
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        converted["response_format"] = (response_format, "text.format")
    params = read_params(body, RULES, limits, converted)
    return Fields(item_id, None, messages, params, limits.adapter, "responses")


def _input(body: Mapping[Any, Any]) -> list[Message]:
    value = body.get("input")
    if value is None:
        raise Problem("is required for /v1/responses (a string or a list of messages)", "body.input")
    if isinstance(value, str):
        messages = [Message(role="user", content=check_prompt(value, "body.input"))]
    elif isinstance(value, list):
        messages = check_messages(
            [_message(raw, f"body.input[{i}]") for i, raw in enumerate(value)], "body.input", allow_parts=True
        )
    else:
        raise Problem(f"must be a string or a list of messages, not {describe(value)}", "body.input")
    instructions = body.get("instructions")
    if instructions is None:
        return messages
    if not isinstance(instructions, str):
        raise Problem(f"must be a string, not {describe(instructions)}", "body.instructions")
    system = check_message({"role": "system", "content": instructions}, "body.instructions", allow_parts=True)
    return [system, *messages]


def _message(raw: object, field_name: str) -> object:
    """A message item as a chat message (its ``type``, ``id`` and ``status`` dropped)."""
    if not isinstance(raw, Mapping):
        return raw  # check_messages names what is wrong with it
    kind = raw.get("type", "message")
    if kind != "message":
        raise Problem(
            f"only message items (role and content) are supported, got an item of type {describe(kind)}",
            f"{field_name}.type",
        )
    check_keys(raw, MESSAGE_ITEM_KEYS, prefix=f"{field_name}.")
    return {k: v for k, v in raw.items() if k in ("role", "content")}


def _text_format(text: object) -> ResponseFormat | None:
    """``body.text``: ``format`` (text, json_object or json_schema) and ``verbosity``."""
    if text is None:
        return None
    text = require_object(text, "body.text", "format")
    check_keys(text, TEXT_KEYS, prefix="body.text.")
    verbosity = text.get("verbosity")
    if verbosity not in (None, "medium"):
        raise Problem(
            f"is not supported: genq cannot make a model more or less verbose, got {describe(verbosity)}",
            "body.text.verbosity",
        )
    fmt = text.get("format")
    if fmt is None:
        return None
    fmt = require_object(fmt, "body.text.format", '"type"')
    check_keys(fmt, FORMAT_KEYS, prefix="body.text.format.")
    if fmt.get("type") != "json_schema":
        for key in ("name", "schema", "strict", "description"):
            if fmt.get(key) is not None:
                raise Problem('is only allowed with "type": "json_schema"', f"body.text.format.{key}")
        return check_response_format({"type": fmt.get("type")}, "body.text.format")
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return ResponseFormat(type="json_schema", json_schema=check_json_schema(spec, "body.text.format"))
