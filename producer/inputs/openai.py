"""The OpenAI batch input format: ``{"custom_id", "method", "url", "body"}``, a chat or completion
request per line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.inputs.checks import (
    Fields,
    InputLimits,
    check_id,
    check_keys,
    check_messages,
    check_params,
    check_prompt,
)
from producer.inputs.words import Problem, describe, safe
from worker.core.schema import GenParams, Message

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

OPENAI_KEYS: frozenset[str] = frozenset({"custom_id", "method", "url", "body"})

BODY_PARAMS: Mapping[str, str] = {
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
}
"""OpenAI body key → GenParams field."""

BODY_IGNORED: frozenset[str] = frozenset(
    {"model", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
)
"""Body keys that do not change what is generated (the worker's profile decides the model)."""

BODY_REFUSED: Mapping[str, str] = {
    "logit_bias": "its keys are token ids of OpenAI's tokenizers, which name other tokens in this "
    "model's vocabulary, so it cannot mean what it says here",
    "tools": "tool and function calls are not supported by genq",
    "tool_choice": "tool and function calls are not supported by genq",
    "functions": "tool and function calls are not supported by genq",
    "function_call": "tool and function calls are not supported by genq",
    "parallel_tool_calls": "tool and function calls are not supported by genq",
    "best_of": "genq does not rank samples (best_of); ask for several with n instead",
    "echo": "genq does not echo the prompt back in the completion",
    "suffix": "insertion (a suffix after the completion) is not supported by genq",
    "stream_options": "streaming is not supported in a batch",
}
"""Body keys refused with the reason, unless they hold their no-op value (null, false, 1, {})."""

NO_OP_VALUES: Mapping[str, tuple[object, ...]] = {
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
}


def openai_fields(record: Mapping[Any, Any], limits: InputLimits) -> Fields:
    check_keys(record, OPENAI_KEYS, prefix="")
    if record.get("custom_id") is None:
        raise Problem("is required (the id of the request)", "custom_id")
    item_id = check_id(record["custom_id"], "custom_id")
    method = record.get("method", "POST")
    if method != "POST":
        raise Problem(f'must be "POST", not {describe(method)}', "method")
    url = record.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        got = "it is missing" if url is None else f"got {describe(url)}"
        raise Problem(f'must be "{CHAT_URL}" or "{COMPLETIONS_URL}"; {got}', "url")
    body = record.get("body")
    if not isinstance(body, Mapping):
        got = "it is missing" if body is None else f"got {describe(body)}"
        raise Problem(f"must be an object with the request; {got}", "body")
    prompt, messages = _openai_input(body, url)
    # OpenAI lines carry no adapter of their own: they take the job's (--adapter)
    return Fields(item_id, prompt, messages, _openai_params(body, limits, url), limits.adapter)


def _openai_input(body: Mapping[Any, Any], url: str) -> tuple[str | None, list[Message] | None]:
    wanted, other = ("messages", "prompt") if url == CHAT_URL else ("prompt", "messages")
    if body.get(other) is not None:
        raise Problem(f"is not part of a {url} request (use body.{wanted})", f"body.{other}")
    if body.get(wanted) is None:
        raise Problem(f"is required for {url}", f"body.{wanted}")
    if url == CHAT_URL:
        return None, check_messages(body["messages"], "body.messages", allow_parts=True)
    return check_prompt(body["prompt"], "body.prompt"), None


def _openai_params(body: Mapping[Any, Any], limits: InputLimits, url: str) -> GenParams:
    raw: dict[str, Any] = {}
    source_key: dict[str, str] = {}
    for key, value in body.items():
        if key in ("messages", "prompt") or key in BODY_IGNORED or value is None:
            continue
        if key in BODY_REFUSED:
            if any(type(value) is type(ok) and value == ok for ok in NO_OP_VALUES.get(key, ())):
                continue
            raise Problem(f"is not supported: {BODY_REFUSED[key]}", f"body.{key}")
        if key == "n" and type(value) is int and value == 1:
            continue  # the default: the same request as without it
        if key == "logprobs" and url == COMPLETIONS_URL:
            raw["logprobs"], raw["top_logprobs"] = _completion_logprobs(value)
            source_key["logprobs"] = source_key["top_logprobs"] = key
            continue
        if key in BODY_PARAMS:
            name = BODY_PARAMS[key]
            if name in raw and raw[name] != value:
                raise Problem(
                    f"conflicts with body.{source_key[name]} ({describe(raw[name])})", f"body.{key}"
                )
            raw[name], source_key[name] = value, key
        elif key == "stream":
            if value is not False:
                raise Problem(f"streaming is not supported in a batch, got {describe(value)}", "body.stream")
        else:
            raise Problem(
                "is not supported by genq (refused rather than ignored, because it would change the result)",
                f"body.{safe(str(key))}",
            )
    return check_params(raw, limits, lambda name: f"body.{source_key.get(name, name)}")


def _completion_logprobs(value: object) -> tuple[bool, int]:
    """/v1/completions' ``logprobs``: an integer 0–5, the number of alternatives per token."""
    if type(value) is not int or not 0 <= value <= 5:
        raise Problem(
            f"must be an integer from 0 to 5 in a /v1/completions request, got {describe(value)}",
            "body.logprobs",
        )
    return True, value
