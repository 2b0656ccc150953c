"""Answers in the shapes of the OpenAI Responses API and of Anthropic's Message Batches results.

* :func:`response_body`: the ``body`` of an OpenAI batch output line for a ``/v1/responses``
  request, a ``response`` object: ``status`` ``completed`` (or ``incomplete`` with
  ``incomplete_details.reason: "max_output_tokens"`` when the budget ran out), one ``message``
  output item with one ``output_text`` part, ``usage`` {``input_tokens``, ``output_tokens``,
  ``total_tokens``, and their details}.  The request's sampling fields are echoed as OpenAI does.
* :func:`anthropic_row`: ``{"custom_id", "result"}`` with ``result.type`` ``succeeded`` (a
  ``message``: one ``text`` block, ``stop_reason`` ``end_turn``/``max_tokens``/``stop_sequence``,
  ``usage`` {``input_tokens``, ``output_tokens``}), ``errored`` (Anthropic's error shape:
  ``{"type": "error", "error": {"type", "message"}}``, genq's own code at the head of the
  message), ``canceled`` or ``expired``.

Ids (``resp_…``, ``msg_…``) are derived from the item id like the chat rows' ids, so the same
results always give the same ids.
"""

from __future__ import annotations

from typing import Any

from worker.core.schema import Item, ItemResult
from worker.core.states import ErrorCode, FinishReason

ANTHROPIC_ERROR_TYPES: dict[str, str] = {
    ErrorCode.INVALID_INPUT: "invalid_request_error",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorCode.UNKNOWN_PROFILE: "not_found_error",
    ErrorCode.OUT_OF_MEMORY: "overloaded_error",
}
"""genq's error codes as Anthropic's error types; every other code is an ``api_error``."""


def response_body(
    result: ItemResult, item: Item | None, digest: str, *, model: str, created: int
) -> dict[str, Any]:
    """The ``response`` object of a successful ``/v1/responses`` request."""
    params = item.params if item is not None else None
    cut = result.finish_reason == FinishReason.LENGTH
    usage = result.usage
    fmt = params.response_format if params is not None else None
    if fmt is None or fmt.type == "text":
        text_format: dict[str, Any] = {"type": "text"}
    elif fmt.json_schema is None:
        text_format = {"type": fmt.type}
    else:
        spec = fmt.json_schema
        text_format = {
            "type": "json_schema",
            "name": spec.name,
            "schema": fmt.target_schema(),
            "strict": spec.strict,
            "description": spec.description,
        }
    message = {
        "id": f"msg_{digest}",
        "type": "message",
        "role": "assistant",
        "status": "incomplete" if cut else "completed",
        "content": [{"type": "output_text", "text": result.text or "", "annotations": []}],
    }
    body: dict[str, Any] = {
        "id": f"resp_{digest}",
        "object": "response",
        "created_at": created,
        "status": "incomplete" if cut else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": None,
        "max_output_tokens": params.max_new_tokens if params is not None else None,
        "model": result.model or model,
        "output": [message],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": params.temperature if params is not None else None,
        "text": {"format": text_format},
        "tool_choice": "auto",
        "tools": [],
        "top_p": params.top_p if params is not None else None,
        "truncation": "disabled",
        "usage": {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
        "user": None,
        "metadata": {},
    }
    if result.json_valid is not None:
        body["json_valid"] = result.json_valid  # a genq addition, as on chat choices
    return body


def anthropic_row(result: ItemResult, digest: str, *, model: str) -> dict[str, Any]:
    """One line of a Message Batch's results."""
    row: dict[str, Any] = {"custom_id": result.id}
    if result.status == "error":
        code = result.error.type if result.error else ErrorCode.GENQ_ERROR
        if code == ErrorCode.CANCELLED:
            row["result"] = {"type": "canceled"}
        elif code == ErrorCode.EXPIRED:
            row["result"] = {"type": "expired"}
        else:
            detail = result.error.message if result.error else "the item failed"
            row["result"] = {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {
                        "type": ANTHROPIC_ERROR_TYPES.get(code, "api_error"),
                        "message": f"{code}: {detail}",
                    },
                },
            }
        return row
    if result.finish_reason == FinishReason.LENGTH:
        stop_reason = "max_tokens"
    else:
        stop_reason = "stop_sequence" if result.stop_sequence is not None else "end_turn"
    message: dict[str, Any] = {
        "id": f"msg_{digest}",
        "type": "message",
        "role": "assistant",
        "model": result.model or model,
        "content": [{"type": "text", "text": result.text or ""}],
        "stop_reason": stop_reason,
        "stop_sequence": result.stop_sequence,
        "usage": {
            "input_tokens": result.usage.prompt_tokens,
            "output_tokens": result.usage.completion_tokens,
        },
    }
    row["result"] = {"type": "succeeded", "message": message}
    return row
