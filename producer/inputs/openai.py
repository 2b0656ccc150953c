"""The OpenAI batch input format: ``{"custom_id", "method", "url", "body"}``, a chat or completion
request per line; Azure OpenAI's batch files are the same with ``url`` without ``/v1``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.inputs.bodies import STREAM, TOOLS, BodyRules, read_params, require_object
from producer.inputs.checks import Fields, InputLimits, check_id, check_keys, check_messages, check_prompt
from producer.inputs.words import Problem, describe
from worker.core.schema import Api, GenParams, Message

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
RESPONSES_URL = "/v1/responses"

OPENAI_URLS: Mapping[str, Api] = {CHAT_URL: "chat", COMPLETIONS_URL: "completions"}
AZURE_URLS: Mapping[str, Api] = {"/chat/completions": "chat", "/completions": "completions"}
"""Azure OpenAI's batch lines name the endpoint without the ``/v1`` prefix."""

OPENAI_KEYS: frozenset[str] = frozenset({"custom_id", "method", "url", "body"})

BODY_IGNORED: frozenset[str] = frozenset(
    {"model", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
)
"""Body keys that do not change what is generated (the worker's profile decides the model)."""

CHAT_RULES = BodyRules(
    prefix="body.",
    params={
        "max_tokens": "max_new_tokens",
        "max_completion_tokens": "max_new_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "seed": "seed",
        "stop": "stop",
        "response_format": "response_format",
        "logprobs": "logprobs",
        "top_logprobs": "top_logprobs",
        "n": "n",
        "presence_penalty": "presence_penalty",
        "frequency_penalty": "frequency_penalty",
    },
    ignored=BODY_IGNORED,
    refused={
        "logit_bias": "its keys are token ids of OpenAI's tokenizers, which name other tokens in this "
        "model's vocabulary, so it cannot mean what it says here",
        "tools": TOOLS,
        "tool_choice": TOOLS,
        "functions": TOOLS,
        "function_call": TOOLS,
        "parallel_tool_calls": TOOLS,
        "best_of": "genq does not rank samples (best_of); ask for several with n instead",
        "echo": "genq does not echo the prompt back in the completion",
        "suffix": "insertion (a suffix after the completion) is not supported by genq",
        "stream_options": STREAM,
        "stream": STREAM,
    },
    no_op={
        "logit_bias": ({},),
        "tools": ([],),
        "functions": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (True, False),
        "best_of": (1,),
        "echo": (False,),
        "suffix": ("",),
        "stream": (False,),
    },
    read=frozenset({"messages", "prompt"}),
)


def openai_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    return _fields(record, limits, OPENAI_URLS)


def azure_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    return _fields(record, limits, AZURE_URLS)


def batch_body(record: Mapping[Any, Any], urls: Mapping[str, Api]) -> tuple[str, str, Mapping[Any, Any]]:
    """The custom_id, url and body of an OpenAI-style batch line whose url is one of ``urls``."""
    check_keys(record, OPENAI_KEYS, prefix="")
    if record.get("custom_id") is None:
        raise Problem("is required (the id of the request)", "custom_id")
    item_id = check_id(record["custom_id"], "custom_id")
    method = record.get("method", "POST")
    if method != "POST":
        raise Problem(f'must be "POST", not {describe(method)}', "method")
    url = record.get("url")
    if not isinstance(url, str) or url not in urls:
        got = "it is missing" if url is None else f"got {describe(url)}"
        allowed = " or ".join(f'"{u}"' for u in urls)
        raise Problem(f"must be {allowed}; {got}", "url")
    body = require_object(record.get("body"), "body", "the request")
    return item_id, url, body


def _fields(record: Mapping[Any, Any], limits: InputLimits, urls: Mapping[str, Api]) -> Fields:
    item_id, url, body = batch_body(record, urls)
    api = urls[url]
    prompt, messages = _openai_input(body, url, api)
    # OpenAI lines carry no adapter of their own: they take the job's (--adapter)
    return Fields(item_id, prompt, messages, _openai_params(body, limits, api), limits.adapter, api)


def _openai_input(body: Mapping[Any, Any], url: str, api: Api) -> tuple[str | None, list[Message] | None]:
    wanted, other = ("messages", "prompt") if api == "chat" else ("prompt", "messages")
    if body.get(other) is not None:
        raise Problem(f"is not part of a {url} request (use body.{wanted})", f"body.{other}")
    if body.get(wanted) is None:
        raise Problem(f"is required for {url}", f"body.{wanted}")
    if api == "chat":
        return None, check_messages(body["messages"], "body.messages", allow_parts=True)
    return check_prompt(body["prompt"], "body.prompt"), None


def _openai_params(body: Mapping[Any, Any], limits: InputLimits, api: Api) -> GenParams:
    converted: dict[str, tuple[object, str]] = {}
    rest = dict(body)
    if type(rest.get("n")) is int and rest["n"] == 1:
        del rest["n"]  # the default: the same request as without it
    if api == "completions" and rest.get("logprobs") is not None:
        logprobs, top = _completion_logprobs(rest.pop("logprobs"))
        converted = {"logprobs": (logprobs, "logprobs"), "top_logprobs": (top, "logprobs")}
    return read_params(rest, CHAT_RULES, limits, converted)


def _completion_logprobs(value: object) -> tuple[bool, int]:
    """/v1/completions' ``logprobs``: an integer 0–5, the number of alternatives per token."""
    if type(value) is not int or not 0 <= value <= 5:
        raise Problem(
            f"must be an integer from 0 to 5 in a /v1/completions request, got {describe(value)}",
            "body.logprobs",
        )
    return True, value
