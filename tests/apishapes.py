"""Field-by-field checks of output lines against each API's shape, and validation by the official
``openai`` and ``anthropic`` packages' own response types.

The shapes are those of the APIs' published references: ``tests/data/*_example.jsonl`` hold
lines as OpenAI's and Anthropic's documentation show them, and every genq line must have exactly
their fields (plus genq's documented ``json_valid``), besides the value checks against the
request that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from anthropic.types.messages import MessageBatchIndividualResponse
from openai.types import Batch, BatchError
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

DATA = Path(__file__).resolve().parent / "data"
TINY_MODEL = "tiny-random:tiny-random-lora"
GENQ_EXTRAS = frozenset({"json_valid"})
"""genq's one addition to a body or a choice: whether a JSON answer is complete and valid."""


def data_rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def requests(name: str) -> list[dict[str, Any]]:
    """The request lines of a dialect's example file (``tests/data/<name>_batch.jsonl``)."""
    return data_rows(f"{name}_batch.jsonl")


def same_fields(got: Any, want: Any, path: str = "", skip: frozenset[str] = frozenset()) -> None:
    """``got`` has exactly the fields of ``want`` at every level (lists: each element against the
    example's first one), apart from genq's ``json_valid``; ``skip`` names fields compared elsewhere."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{path}: expected an object, got {got!r}"
        extra = set(got) - set(want) - GENQ_EXTRAS
        missing = set(want) - set(got)
        assert not extra and not missing, f"{path}: extra {sorted(extra)}, missing {sorted(missing)}"
        for key, value in want.items():
            if key not in skip and value is not None and got.get(key) is not None:
                same_fields(got[key], value, f"{path}.{key}", skip)
    elif isinstance(want, list) and want:
        assert isinstance(got, list), f"{path}: expected a list, got {got!r}"
        for i, element in enumerate(got):
            same_fields(element, want[0], f"{path}[{i}]", skip)


def exact_properties(text: str, schema: dict[str, Any]) -> None:
    """A strict schema's answer: valid JSON with exactly the listed properties, valid against it."""
    value = json.loads(text)
    assert set(value) == set(schema["properties"]), (value, schema["properties"])
    jsonschema.validate(value, schema)


# --- OpenAI Responses -------------------------------------------------------------------------


def check_responses_row(row: dict[str, Any], request: dict[str, Any], model: str = TINY_MODEL) -> str:
    """A successful /v1/responses line; returns the answer's text."""
    example = data_rows("responses_output_example.jsonl")[0]
    same_fields(row, example, skip=frozenset({"text", "metadata", "reasoning"}))
    body_in = request["body"]
    assert row["custom_id"] == request["custom_id"] and row["id"].startswith("batch_req_")
    assert row["error"] is None
    response = row["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == model
    assert isinstance(body["created_at"], int) and body["error"] is None
    assert body["tools"] == [] and body["tool_choice"] == "auto" and body["truncation"] == "disabled"
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_")
    (part,) = message["content"]
    assert part["type"] == "output_text" and part["annotations"] == [] and isinstance(part["text"], str)
    usage = body["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    budget = body_in["max_output_tokens"]
    assert body["max_output_tokens"] == budget
    assert body["temperature"] == body_in.get("temperature") and body["top_p"] == body_in.get("top_p")
    if body["status"] == "incomplete":
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert message["status"] == "incomplete" and usage["output_tokens"] == budget
    else:
        assert body["status"] == "completed" and body["incomplete_details"] is None
        assert message["status"] == "completed" and usage["output_tokens"] <= budget
    fmt = body_in.get("text", {}).get("format")
    if fmt is None:
        assert body["text"] == {"format": {"type": "text"}} and "json_valid" not in body
    else:
        assert body["text"]["format"] == {**fmt, "description": None}
        assert body["json_valid"] is (body["status"] == "completed")
        if body["status"] == "completed":
            exact_properties(part["text"], fmt["schema"])
    parsed = Response.model_validate(body)  # the official type, as a client parses it
    assert parsed.output_text == part["text"]
    return str(part["text"])


def check_openai_error_row(row: dict[str, Any], custom_id: str, code: str) -> None:
    """An errored request in OpenAI's batch output (chat, completions and Responses alike)."""
    example = data_rows("responses_output_example.jsonl")[1]
    same_fields(row, example)
    assert row["custom_id"] == custom_id and row["id"].startswith("batch_req_")
    assert row["response"] is None and row["error"]["code"] == code and row["error"]["message"]
    BatchError.model_validate(row["error"])


# --- OpenAI / Azure chat completions ----------------------------------------------------------


def check_chat_row(row: dict[str, Any], request: dict[str, Any], model: str = TINY_MODEL) -> str:
    """A successful chat completions line (OpenAI's or Azure's batch output); returns the text."""
    assert set(row) == {"id", "custom_id", "response", "error"} and row["error"] is None
    assert row["custom_id"] == request["custom_id"] and row["id"].startswith("batch_req_")
    body = row["response"]["body"]
    assert row["response"]["status_code"] == 200
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and body["model"] == model
    (choice,) = body["choices"]
    body_in = request["body"]
    schema = body_in.get("response_format", {}).get("json_schema", {}).get("schema")
    want = {"index", "message", "logprobs", "finish_reason"} | ({"json_valid"} if schema else set())
    assert set(choice) == want and choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == body_in["max_tokens"]
    else:
        assert choice["finish_reason"] == "stop" and usage["completion_tokens"] <= body_in["max_tokens"]
        if schema:
            exact_properties(choice["message"]["content"], schema)
    ChatCompletion.model_validate(body)
    return str(choice["message"]["content"])


# --- Anthropic Message Batches ----------------------------------------------------------------


def check_anthropic_row(row: dict[str, Any], request: dict[str, Any], model: str = TINY_MODEL) -> str:
    """A succeeded Message Batches result line; returns the answer's text."""
    example = data_rows("anthropic_results_example.jsonl")[0]
    same_fields(row, example)
    params = request["params"]
    assert row["custom_id"] == request["custom_id"] and row["result"]["type"] == "succeeded"
    message = row["result"]["message"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["model"] == model
    assert message["id"].startswith("msg_")
    (block,) = message["content"]
    assert block["type"] == "text" and isinstance(block["text"], str)
    usage = message["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    reason = message["stop_reason"]
    if reason == "max_tokens":
        assert usage["output_tokens"] == params["max_tokens"] and message["stop_sequence"] is None
    elif reason == "stop_sequence":
        assert message["stop_sequence"] in params["stop_sequences"]
        assert message["stop_sequence"] not in block["text"]
    else:
        assert reason == "end_turn" and message["stop_sequence"] is None
    schema = params.get("output_config", {}).get("format", {}).get("schema")
    if schema is not None and reason == "end_turn":
        exact_properties(block["text"], schema)
    parsed = MessageBatchIndividualResponse.model_validate(row)
    assert parsed.result.type == "succeeded" and parsed.result.message.content[0].text == block["text"]  # type: ignore[union-attr]
    return str(block["text"])


def check_anthropic_error_row(row: dict[str, Any], custom_id: str, kind: str, words: str) -> None:
    """An errored result: Anthropic's error shape, genq's code at the head of the message."""
    example = data_rows("anthropic_results_example.jsonl")[2]
    same_fields(row, example)
    assert row["custom_id"] == custom_id
    error = row["result"]["error"]
    assert error["type"] == "error" and error["error"]["type"] == kind and words in error["error"]["message"]
    MessageBatchIndividualResponse.model_validate(row)


def check_batch_object(batch: dict[str, Any], job: str, endpoint: str) -> Batch:
    parsed = Batch.model_validate(batch)
    assert batch["id"] == job and batch["object"] == "batch" and batch["endpoint"] == endpoint
    assert isinstance(batch["completion_window"], str)
    return parsed
