"""The ``choices`` of an OpenAI-shaped output row: one per sample, with logprobs in the shape of
the endpoint that was asked (chat: ``logprobs.content[]``; completions: ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``).

``json_valid`` is added to a choice when its request had a JSON ``response_format`` (a genq
addition: ``false`` marks an answer cut short, which ``finish_reason: "length"`` also says).
"""

from __future__ import annotations

from typing import Any

from worker.core.schema import ItemResult
from worker.core.states import FinishReason
from worker.core.structured import Choice, TokenLogprob


def samples(result: ItemResult) -> list[Choice]:
    """Every sample of a successful result (one when ``n`` was 1)."""
    if result.choices is not None:
        return list(result.choices)
    return [
        Choice(
            index=0,
            text=result.text or "",
            finish_reason=result.finish_reason or FinishReason.STOP,
            logprobs=result.logprobs,
            json_valid=result.json_valid,
            completion_tokens=result.usage.completion_tokens,
        )
    ]


def openai_choices(result: ItemResult, *, chat: bool) -> list[dict[str, Any]]:
    out = []
    for c in samples(result):
        choice: dict[str, Any] = {"index": c.index}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
            choice["logprobs"] = None if c.logprobs is None else chat_logprobs(c.logprobs)
        else:
            choice["text"] = c.text
            choice["logprobs"] = None if c.logprobs is None else completion_logprobs(c.logprobs)
        choice["finish_reason"] = str(c.finish_reason)
        if c.json_valid is not None:
            choice["json_valid"] = c.json_valid
        out.append(choice)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [e.model_dump() for e in entries], "refusal": None}


def legacy_token(token: str, raw: list[int] | None) -> str:
    """A token as the legacy completions shape names it: its text, or, when its bytes are not
    text on their own (part of a UTF-8 character), ``bytes:\\xNN…`` as OpenAI writes them.  Two
    different tokens then never share a name, so none of a position's alternatives is lost to
    another's key in ``top_logprobs``."""
    if raw is None:
        return token
    try:
        if bytes(raw).decode("utf-8") == token:
            return token
    except UnicodeDecodeError:
        pass
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, alternatives as ``{token: logprob}``."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [legacy_token(e.token, e.bytes) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {legacy_token(t.token, t.bytes): t.logprob for t in e.top_logprobs} for e in entries
        ],
        "text_offset": offsets,
    }
