"""worker.core.outputs: native and OpenAI batch output rows, atomic writes, resuming from a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.core.errors import InputError
from worker.core.outputs import append_row, read_done, result_row, trim_partial_line, write_results
from worker.core.schema import ErrorInfo, Item, ItemResult, Message, Usage

CHAT_ITEM = Item(index=0, id="c1", line=1, messages=[Message(role="user", content="hi")])
PROMPT_ITEM = Item(index=1, id="p1", line=2, prompt="Once upon")


def ok(item: Item, text: str = "Hello ✓", finish: str = "stop") -> ItemResult:
    return ItemResult(
        index=item.index,
        id=item.id,
        line=item.line,
        status="ok",
        text=text,
        finish_reason=finish,  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=7, completion_tokens=3),
        profile="tiny",
        mode="fp32",
        worker="w1",
        latency_ms=12.5,
    )


def failed(item: Item) -> ItemResult:
    return ItemResult(
        index=item.index,
        id=item.id,
        line=item.line,
        status="error",
        error=ErrorInfo(type="context_length_exceeded", message="prompt has 9000 tokens, context is 8192"),
        attempts=2,
    )


# --- native rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", [CHAT_ITEM, PROMPT_ITEM], ids=["chat", "completion"])
def test_native_ok_row(item: Item) -> None:
    row = result_row(ok(item), item, "native", model="m")
    assert row == ok(item).public()
    assert row["status"] == "ok" and row["text"] == "Hello ✓" and "index" not in row
    assert row["usage"] == {"prompt_tokens": 7, "completion_tokens": 3}


@pytest.mark.parametrize("item", [CHAT_ITEM, PROMPT_ITEM], ids=["chat", "completion"])
def test_native_error_row(item: Item) -> None:
    row = result_row(failed(item), item, "native", model="m")
    assert row["status"] == "error" and "text" not in row and "finish_reason" not in row
    assert row["error"] == {
        "type": "context_length_exceeded",
        "message": "prompt has 9000 tokens, context is 8192",
    }
    assert row["id"] == item.id and row["line"] == item.line


# --- openai rows ---------------------------------------------------------------------------


def test_openai_chat_ok_row() -> None:
    row = result_row(ok(CHAT_ITEM, finish="length"), CHAT_ITEM, "openai", model="qwen", created=1700000000)
    assert row["custom_id"] == "c1" and row["error"] is None
    assert row["id"].startswith("batch_req_")
    response = row["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["created"] == 1700000000 and body["model"] == "qwen"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello ✓"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_openai_completion_ok_row() -> None:
    row = result_row(ok(PROMPT_ITEM), PROMPT_ITEM, "openai", model="qwen", created=1)
    body = row["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello ✓", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["total_tokens"] == 10


def test_legacy_logprobs_keep_alternatives_that_are_not_text_on_their_own() -> None:
    """Two alternatives that are each part of a UTF-8 character both read as "\ufffd": keyed by
    that text, the legacy ``top_logprobs`` dict kept one of them (CI once saw a position with one
    alternative of two asked).  They are named ``bytes:\\xNN…`` as OpenAI names such tokens."""
    from worker.core.structured import TokenLogprob, TopLogprob

    alts = [
        TopLogprob(token="\ufffd", logprob=-0.5, bytes=[0xE2, 0x80]),
        TopLogprob(token="\ufffd", logprob=-1.5, bytes=[0xE2]),
    ]
    entries = [
        TokenLogprob(token="\ufffd", logprob=-0.5, bytes=[0xE2, 0x80], top_logprobs=alts),
        TokenLogprob(token="é", logprob=-0.1, bytes=[0xC3, 0xA9], top_logprobs=[]),
    ]
    result = ok(PROMPT_ITEM).model_copy(update={"logprobs": entries})
    lp = result_row(result, PROMPT_ITEM, "openai", model="qwen", created=1)["response"]["body"]["choices"][0][
        "logprobs"
    ]
    assert lp["tokens"] == ["bytes:\\xe2\\x80", "é"]
    assert lp["top_logprobs"][0] == {"bytes:\\xe2\\x80": -0.5, "bytes:\\xe2": -1.5}
    assert lp["text_offset"] == [0, 1]


@pytest.mark.parametrize("item", [CHAT_ITEM, PROMPT_ITEM], ids=["chat", "completion"])
def test_openai_error_row(item: Item) -> None:
    row = result_row(failed(item), item, "openai", model="qwen")
    assert row["custom_id"] == item.id and row["response"] is None
    assert row["error"] == {
        "code": "context_length_exceeded",
        "message": "prompt has 9000 tokens, context is 8192",
    }
    assert set(row) == {"id", "custom_id", "response", "error"}


def test_openai_ids_are_stable_and_distinct() -> None:
    a1 = result_row(ok(CHAT_ITEM), CHAT_ITEM, "openai", model="m", created=1)
    a2 = result_row(ok(CHAT_ITEM), CHAT_ITEM, "openai", model="m", created=1)
    b = result_row(ok(PROMPT_ITEM), PROMPT_ITEM, "openai", model="m", created=1)
    assert a1 == a2
    assert a1["id"] != b["id"]
    assert a1["response"]["request_id"] != b["response"]["request_id"]


def test_openai_row_without_item_is_chat() -> None:
    row = result_row(ok(PROMPT_ITEM), None, "openai", model="m")
    assert row["response"]["body"]["object"] == "chat.completion"
    assert isinstance(row["response"]["body"]["created"], int)


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        result_row(ok(CHAT_ITEM), CHAT_ITEM, "csv", model="m")  # type: ignore[arg-type]


# --- write_results -------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("fmt", ["native", "openai"])
def test_write_results(tmp_path: Path, fmt: Any) -> None:
    path = tmp_path / "out.jsonl"
    pairs = [(ok(CHAT_ITEM), CHAT_ITEM), (failed(PROMPT_ITEM), PROMPT_ITEM)]
    assert write_results(pairs, path, fmt, model="m") == 2
    rows = read_rows(path)
    key = "id" if fmt == "native" else "custom_id"
    assert [row[key] for row in rows] == ["c1", "p1"]
    assert "✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False: written as UTF-8, not \u escapes
    assert not (tmp_path / "out.jsonl.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_write_results_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n" * 10)
    assert write_results([(ok(PROMPT_ITEM), PROMPT_ITEM)], str(path), model="m") == 1
    assert [row["id"] for row in read_rows(path)] == ["p1"]
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_write_results_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def pairs() -> Any:
        yield ok(CHAT_ITEM), CHAT_ITEM
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_results(pairs(), path, model="m")
    assert path.read_text() == "old\n"
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_write_results_empty(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    assert write_results([], path, model="m") == 0
    assert path.read_text() == ""


# --- append_row and read_done --------------------------------------------------------------


def test_append_row_writes_one_flushed_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        append_row(fh, {"id": "a", "text": "é"})
        assert path.read_text(encoding="utf-8") == '{"id":"a","text":"é"}\n'  # flushed before close
        append_row(fh, {"id": "b"})
    assert list(read_done(path)) == ["a", "b"]


def test_read_done_missing_file(tmp_path: Path) -> None:
    assert read_done(tmp_path / "nope.jsonl") == {}


@pytest.mark.parametrize("fmt", ["native", "openai"])
def test_read_done_ignores_truncated_last_line(tmp_path: Path, fmt: Any) -> None:
    path = tmp_path / "out.jsonl"
    write_results([(ok(CHAT_ITEM), CHAT_ITEM), (failed(PROMPT_ITEM), PROMPT_ITEM)], path, fmt, model="m")
    full = path.read_bytes()
    third = json.dumps(result_row(ok(CHAT_ITEM), CHAT_ITEM, fmt, model="m") | {"custom_id": "x", "id": "x"})
    path.write_bytes(full + third.encode()[:25])  # crash mid-write
    done = read_done(path)
    assert list(done) == ["c1", "p1"]
    key = "id" if fmt == "native" else "custom_id"
    assert done["p1"][key] == "p1"


@pytest.mark.parametrize(
    "tail",
    [b'{"id": "x", "te', b"\xe2\x9c", b"[1, 2]\n", b'{"no_id": 1}\n', b"garbage\n\n\n"],
    ids=["cut_json", "cut_utf8", "not_object", "no_id", "garbage_then_blank"],
)
def test_read_done_ignores_garbled_last_line(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "status": "ok"}\n\n' + tail)
    assert list(read_done(path)) == ["a"]


def test_read_done_raises_on_garbled_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", tr\n{"id": "c"}\n')
    with pytest.raises(InputError) as info:
        read_done(path)
    assert info.value.line == 2 and info.value.source == str(path)


def test_read_done_first_row_wins(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "n": 1}\n{"id": "a", "n": 2}\n')
    assert read_done(path) == {"a": {"id": "a", "n": 1}}


def test_trim_partial_line_then_append(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "te')
    assert trim_partial_line(path) == len(b'{"id": "b", "te')
    with path.open("a", encoding="utf-8") as fh:
        append_row(fh, {"id": "b"})
    assert list(read_done(path)) == ["a", "b"]
    assert trim_partial_line(path) == 0
    assert trim_partial_line(tmp_path / "missing.jsonl") == 0


def test_trim_partial_line_without_any_newline(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x" * 100_000)
    assert trim_partial_line(path) == 100_000
    assert path.read_bytes() == b""
