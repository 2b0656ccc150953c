"""Batch files of hosted APIs as their documentation writes them: OpenAI Responses, Anthropic Message
Batches and Azure OpenAI lines are read (one dialect per file), refused line by line with the
field named, and answered through the real `genq run` in each API's own shape, checked field by
field and by the official `openai` and `anthropic` packages' types (tests/apishapes.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from anthropic.types.messages import MessageBatchIndividualResponse

from producer.batch import completion_window
from producer.inputs import read_items
from tests.apishapes import (
    DATA,
    check_anthropic_error_row,
    check_anthropic_row,
    check_chat_row,
    check_openai_error_row,
    check_responses_row,
    data_rows,
    requests,
)
from tests.cluster import run_genq
from tests.schemas import ONE_THREAD, SCHEMAS
from worker.core.errors import InputError
from worker.core.outputs import result_row, row_count_field
from worker.core.schema import ErrorInfo, GenParams, Item, ItemResult, Message, Usage
from worker.core.states import CountField

LONG = "pain " * 400
"""Longer than the tiny profile's context (256 tokens): that item errors, the others go on."""


def write(tmp_path: Path, lines: list[dict[str, Any]], name: str = "in.jsonl", end: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes("".join(json.dumps(line) + end for line in lines).encode())
    return path


def responses_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": body}


def anthropic_line(custom_id: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": {"model": "claude-sonnet-4-5", "max_tokens": 8, **params}}


def chat_line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


USER = [{"role": "user", "content": "hi"}]


# --- reading ----------------------------------------------------------------------------------


def test_responses_file_is_read_field_by_field() -> None:
    read = read_items(DATA / "responses_batch.jsonl")
    assert read.format == "responses" and [it.api for it in read.items] == ["responses"] * 6
    one, two, three, four, five, six = read.items
    assert one.messages == [Message(role="user", content="Tell me a three word joke about aspirin.")]
    assert one.params == GenParams(max_new_tokens=12)
    assert two.messages == [
        Message(role="system", content="You are a careful pharmacist. Answer briefly."),
        Message(role="user", content="What is the usual adult dose of paracetamol?"),
    ]  # instructions in front; store and metadata ignored
    assert two.params == GenParams(max_new_tokens=16, temperature=0.7, top_p=0.9)
    assert three.messages == [
        Message(role="system", content="Reply in one sentence."),  # developer, input_text parts
        Message(role="user", content="Name a symptom of anaemia.\nKeep it short."),
    ]
    assert [m.role for m in four.messages or []] == ["user", "assistant", "user"]  # output_text fed back
    assert four.params == GenParams(max_new_tokens=16)  # reasoning effort ignored: no reasoning model
    fmt = five.params.response_format
    assert fmt is not None and fmt.json_schema is not None
    assert (fmt.type, fmt.json_schema.name, fmt.json_schema.strict) == ("json_schema", "patient", True)
    assert fmt.target_schema() == SCHEMAS["person"]
    assert six.params.response_format is not None and six.params.max_new_tokens == 48


def test_anthropic_file_is_read_field_by_field() -> None:
    read = read_items(DATA / "anthropic_batch.jsonl")
    assert read.format == "anthropic" and {it.api for it in read.items} == {"anthropic"}
    first, second, blocks, stop, js = read.items
    assert (first.id, first.messages, first.params) == (
        "my-first-request",
        [Message(role="user", content="Hello, world")],
        GenParams(max_new_tokens=12),
    )
    assert second.messages is not None and second.messages[0] == Message(
        role="system", content="You are a careful pharmacist."
    )
    assert second.params == GenParams(max_new_tokens=16, temperature=0.5, top_p=0.9, top_k=40)
    assert blocks.messages == [
        Message(role="system", content="Answer in one sentence."),  # a text block with cache_control
        Message(role="user", content="What is asthma?"),
        Message(role="assistant", content="A disease of the airways."),
        Message(role="user", content="And its usual treatment?\nBe brief."),
    ]
    assert stop.params.stop == ["\n\n", "e"]
    assert js.params.response_format is not None
    assert js.params.response_format.target_schema() == SCHEMAS["person"]


def test_azure_file_with_crlf_is_read() -> None:
    raw = (DATA / "azure_batch.jsonl").read_bytes()
    assert raw.count(b"\r\n") == 4 and raw.count(b"\n") == 4  # every line ends in CRLF
    read = read_items(DATA / "azure_batch.jsonl")
    assert read.format == "azure" and [it.api for it in read.items] == ["chat"] * 4
    assert read.items[1].messages is not None
    assert read.items[1].messages[1] == Message(role="user", content="When was the first XBOX released?")
    assert read.items[2].params == GenParams(max_new_tokens=12, temperature=0.8, seed=7)


MIXES = [
    ("responses_then_chat", responses_line("a", {"input": "x"}), chat_line("b", {"messages": USER}),
     "OpenAI batch format but the input is in the OpenAI Responses batch format"),
    ("chat_then_responses", chat_line("a", {"messages": USER}), responses_line("b", {"input": "x"}),
     "OpenAI Responses batch format but the input is in the OpenAI batch format"),
    ("anthropic_then_chat", anthropic_line("a", {"messages": USER}), chat_line("b", {"messages": USER}),
     "OpenAI batch format but the input is in the Anthropic Message Batches format"),
    ("azure_then_openai", chat_line("a", {"messages": USER}, "/chat/completions"),
     chat_line("b", {"messages": USER}), "OpenAI batch format but the input is in the Azure OpenAI"),
    ("native_then_anthropic", {"prompt": "x"}, anthropic_line("b", {"messages": USER}),
     "Anthropic Message Batches format but the input is in the native format"),
]  # fmt: skip


@pytest.mark.parametrize(("first", "second", "words"), [m[1:] for m in MIXES], ids=[m[0] for m in MIXES])
def test_one_dialect_per_file(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any], words: str
) -> None:
    with pytest.raises(InputError) as info:
        again = first | ({"custom_id": "c"} if "custom_id" in first else {"id": "c"})
        read_items(write(tmp_path, [first, again, second]))
    assert info.value.line == 3 and words in info.value.detail and "decided by line 1" in info.value.detail


def test_a_bad_native_line_with_a_stray_params_does_not_make_the_file_anthropic(tmp_path: Path) -> None:
    """A native line names its item by ``id``; a stray ``params`` on it (no prompt) is that line's
    error under --skip-invalid, and the next native line is read as native (found by the
    lifecycle model's long walk: the whole file became an Anthropic one)."""
    read = read_items(
        write(tmp_path, [{"id": "x0", "params": {"max_new_tokens": 2}}, {"id": "x1", "prompt": "hi"}]),
        skip_invalid=True,
    )
    assert read.format == "native"
    assert [it.invalid is None for it in read.items] == [False, True]


STRICT_LOOSE = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
NESTED = {
    "type": "object",
    "properties": {"p": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}},
    "required": ["p"],
    "additionalProperties": False,
}
TOOL_OUTPUT = {"type": "function_call_output", "call_id": "c", "output": "1"}
XML = {"type": "xml"}


def strict_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "name": "s", "strict": True, "schema": schema}


BAD = [
    ("responses_image", responses_line("r", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": "https://x/y.png"}]}]}),
     "body.input[0].content[1]", "got a input_image part"),
    ("responses_previous_id", responses_line("r", {"input": "x", "previous_response_id": "resp_1"}),
     "body.previous_response_id", "keeps no conversation state"),
    ("responses_tools", responses_line("r", {"input": "x", "tools": [{"type": "web_search"}]}),
     "body.tools", "tool and function calls"),
    ("responses_function_item", responses_line("r", {"input": [TOOL_OUTPUT]}),
     "body.input[0].type", "only message items"),
    ("responses_no_input", responses_line("r", {"instructions": "x"}), "body.input", "is required"),
    ("responses_unknown", responses_line("r", {"input": "x", "frequency_penalty": 1}),
     "body.frequency_penalty", "refused rather than ignored"),
    ("responses_strict_required", responses_line("r", {"input": "x", "text": {"format": strict_format(
     STRICT_LOOSE | {"additionalProperties": False})}}),
     "body.text.format.schema", "missing: a, b"),
    ("responses_strict_additional", responses_line("r", {"input": "x", "text": {"format": strict_format(
     STRICT_LOOSE | {"required": ["a", "b"]})}}),
     "body.text.format.schema", '"additionalProperties": false'),
    ("chat_strict_nested", chat_line("c", {"messages": USER, "response_format": {"type": "json_schema",
     "json_schema": {"name": "s", "strict": True, "schema": NESTED}}}),
     "body.response_format.json_schema.schema.properties.p", '"additionalProperties": false'),
    ("anthropic_image", anthropic_line("a", {"messages": [{"role": "user", "content": [{"type": "image",
     "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}]}]}),
     "params.messages[0].content[0]", "got a image part"),
    ("anthropic_tools", anthropic_line("a", {"messages": USER, "tools": [{"name": "t", "input_schema": {}}]}),
     "params.tools", "tool and function calls"),
    ("anthropic_system_role", anthropic_line("a", {"messages": [{"role": "system", "content": "x"}, *USER]}),
     "params.messages[0].role", "goes in params.system"),
    ("anthropic_no_max_tokens", {"custom_id": "a", "params": {"model": "m", "messages": USER}},
     "params.max_tokens", "is required"),
    ("anthropic_unknown", anthropic_line("a", {"messages": USER, "frequency": 1}),
     "params.frequency", "refused rather than ignored"),
    ("anthropic_top_level", {"custom_id": "a", "params": {"max_tokens": 4, "messages": USER}, "url": "/v1/m"},
     "url", "unknown field"),
    ("anthropic_format_type", anthropic_line("a", {"messages": USER, "output_config": {"format": XML}}),
     "params.output_config.format.type", 'must be "json_schema"'),
    ("azure_image", chat_line("z", {"messages": [{"role": "user", "content": [{"type": "image_url",
     "image_url": {"url": "https://x/y.png"}}]}]}, "/chat/completions"),
     "body.messages[0].content[0]", "got a image_url part"),
    ("azure_embeddings", chat_line("z", {"input": "x"}, "/embeddings"), "url", '"/v1/chat/completions"'),
]  # fmt: skip


@pytest.mark.parametrize(("line", "field", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_line_names_line_and_field(tmp_path: Path, line: dict[str, Any], field: str, words: str) -> None:
    good = {
        "r": responses_line("ok", {"input": "x"}),
        "c": chat_line("ok", {"messages": USER}),
        "a": anthropic_line("ok", {"messages": USER}),
        "z": chat_line("ok", {"messages": USER}, "/chat/completions"),
    }[line["custom_id"]]
    if field == "url" and line.get("url") == "/embeddings":
        good = chat_line("ok", {"messages": USER})  # an unknown url reads as OpenAI's: its urls are listed
    with pytest.raises(InputError) as info:
        read_items(write(tmp_path, [good, line]))
    assert (info.value.line, info.value.field) == (2, field), info.value.detail
    assert words in info.value.detail, info.value.detail
    skipped = read_items(write(tmp_path, [good, line], "skip.jsonl"), skip_invalid=True)
    assert skipped.items[1].invalid is not None and skipped.items[1].api == skipped.items[0].api


def test_ignored_fields_change_nothing(tmp_path: Path) -> None:
    """Fields that do not change the answer are accepted and ignored (README lists them)."""
    plain = read_items(
        write(tmp_path, [responses_line("r", {"input": "x"}), responses_line("s", {"input": "y"})], "a.jsonl")
    ).items
    noisy = read_items(
        write(
            tmp_path,
            [
                responses_line(
                    "r",
                    {
                        "input": "x",
                        **{"model": "gpt-5", "metadata": {"k": "v"}, "store": True, "user": "u"},
                        **{"service_tier": "flex", "reasoning": {"effort": "high"}, "truncation": "disabled"},
                        **{"safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": False},
                        **{"tools": [], "tool_choice": "auto", "stream": False, "include": []},
                        "text": {"verbosity": "medium", "format": {"type": "text"}},
                    },
                ),
                responses_line("s", {"input": "y", "background": False}),
            ],
            "b.jsonl",
        )
    ).items
    assert [(i.messages, i.params.model_copy(update={"response_format": None})) for i in noisy] == [
        (i.messages, i.params) for i in plain
    ]
    loud = anthropic_line(
        "a",
        {
            "messages": USER,
            "metadata": {"user_id": "u"},
            "service_tier": "auto",
            "thinking": {"type": "disabled"},
            "stream": False,
            "tools": [],
        },
    )
    quiet = anthropic_line("a", {"messages": USER})
    (x,) = read_items(write(tmp_path, [loud], "c.jsonl")).items
    (y,) = read_items(write(tmp_path, [quiet], "d.jsonl")).items
    assert (x.messages, x.params) == (y.messages, y.params)


def test_strict_false_schema_is_accepted(tmp_path: Path) -> None:
    """Only ``strict: true`` asks for exactly the listed properties; a loose schema without it is
    enforced as written (any of its properties may be left out)."""
    body = {"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": STRICT_LOOSE}}}
    (item,) = read_items(write(tmp_path, [responses_line("r", body)])).items
    assert item.params.response_format is not None


# --- rows without a model ---------------------------------------------------------------------


def _ended(code: str, api: str) -> tuple[ItemResult, Item]:
    item = Item(index=0, id="x1", line=1, messages=[Message(role="user", content="hi")], api=api)  # type: ignore[arg-type]
    result = ItemResult(index=0, id="x1", line=1, status="error", error=ErrorInfo(type=code, message="why"))
    return result, item


@pytest.mark.parametrize(
    ("code", "kind", "count"),
    [
        ("cancelled", "canceled", CountField.CANCELLED),
        ("expired", "expired", CountField.EXPIRED),
        ("context_length_exceeded", "errored", CountField.ERRORED),
        ("worker_lost", "errored", CountField.ERRORED),
    ],
)
def test_anthropic_result_types(code: str, kind: str, count: CountField) -> None:
    result, item = _ended(code, "anthropic")
    row = result_row(result, item, "auto", model="m")
    assert row["result"]["type"] == kind and row_count_field(row) == count
    example = {r["result"]["type"]: r for r in data_rows("anthropic_results_example.jsonl")}[kind]
    assert set(row) == set(example) and set(row["result"]) == set(example["result"])
    MessageBatchIndividualResponse.model_validate(row)
    if kind == "errored":
        expected = "invalid_request_error" if code == "context_length_exceeded" else "api_error"
        check_anthropic_error_row(row, "x1", expected, f"{code}: why")


def test_anthropic_ok_row_counts_as_succeeded() -> None:
    item = Item(index=0, id="x1", messages=[Message(role="user", content="hi")], api="anthropic")
    result = ItemResult(
        index=0, id="x1", status="ok", text="a", finish_reason="stop", usage=Usage(prompt_tokens=2)
    )
    assert row_count_field(result_row(result, item, "auto", model="m")) == CountField.SUCCEEDED


def test_completion_window_is_a_string() -> None:
    assert completion_window(None, 100.0) == "none"
    assert completion_window(100.0 + 86400, 100.0) == "24h"
    assert completion_window(100.0 + 90, 100.0) == "90s"


# --- through `genq run` -----------------------------------------------------------------------


def run(tmp_path: Path, src: Path, *extra: str) -> tuple[list[dict[str, Any]], str]:
    out = tmp_path / (src.stem + ".out.jsonl")
    proc = run_genq(None, "run", str(src), "-o", str(out), "--profile", "tiny-random", *extra, env=ONE_THREAD)
    return [json.loads(line) for line in out.read_text().splitlines()], proc.stderr


def with_bad_lines(tmp_path: Path, name: str, bad: list[dict[str, Any]], end: str = "\n") -> Path:
    """The dialect's example file with ``bad`` lines after it."""
    src = tmp_path / f"{name}_batch.jsonl"
    shutil.copyfile(DATA / f"{name}_batch.jsonl", src)
    with open(src, "ab") as fh:
        fh.write("".join(json.dumps(line) + end for line in bad).encode())
    return src


def test_responses_file_through_genq_run(tmp_path: Path) -> None:
    bad = [
        responses_line("too-long", {"input": LONG, "max_output_tokens": 4}),
        responses_line(
            "image", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}
        ),
    ]
    rows, _ = run(tmp_path, with_bad_lines(tmp_path, "responses", bad), "--skip-invalid")
    want = requests("responses")
    assert [r["custom_id"] for r in rows] == [w["custom_id"] for w in want] + ["too-long", "image"]
    for row, request in zip(rows, want, strict=False):
        check_responses_row(row, request)
    check_openai_error_row(rows[-2], "too-long", "context_length_exceeded")
    check_openai_error_row(rows[-1], "image", "invalid_input")
    assert "input_image" in rows[-1]["error"]["message"]


def test_anthropic_file_through_genq_run_and_resume(tmp_path: Path) -> None:
    bad = [
        anthropic_line("too-long", {"messages": [{"role": "user", "content": LONG}]}),
        anthropic_line("tools", {"messages": USER, "tool_choice": {"type": "any"}}),
    ]
    src = with_bad_lines(tmp_path, "anthropic", bad)
    rows, _ = run(tmp_path, src, "--skip-invalid")
    want = requests("anthropic")
    assert [r["custom_id"] for r in rows] == [w["custom_id"] for w in want] + ["too-long", "tools"]
    texts = [check_anthropic_row(row, request) for row, request in zip(rows, want, strict=False)]
    reasons = {r["custom_id"]: r["result"]["message"]["stop_reason"] for r in rows[: len(want)]}
    assert reasons["stop-request"] == "stop_sequence"  # "e" is in almost any text of 24 tokens
    assert reasons["my-first-request"] == "max_tokens"
    check_anthropic_error_row(rows[-2], "too-long", "invalid_request_error", "context_length_exceeded")
    check_anthropic_error_row(rows[-1], "tools", "invalid_request_error", "params.tool_choice")
    again, stderr = run(tmp_path, src, "--skip-invalid")  # a rerun keeps every row: nothing regenerated
    assert again == rows and "7 resumed" in stderr and "5 ok, 2 errors" in stderr
    assert [check_anthropic_row(row, request) for row, request in zip(again, want, strict=False)] == texts


def test_azure_crlf_file_through_genq_run(tmp_path: Path) -> None:
    bad = [
        chat_line(
            "image", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "/chat/completions"
        )
    ]
    src = with_bad_lines(tmp_path, "azure", bad, end="\r\n")
    rows, _ = run(tmp_path, src, "--skip-invalid")
    want = requests("azure")
    assert [r["custom_id"] for r in rows] == [w["custom_id"] for w in want] + ["image"]
    for row, request in zip(rows, want, strict=False):
        check_chat_row(row, request)
    check_openai_error_row(rows[-1], "image", "invalid_input")


# --- a profile of one's own, by path ----------------------------------------------------------


def test_profile_by_path_for_run_estimate_and_worker_check(tmp_path: Path) -> None:
    """A profile file outside configs/ (its name from the file name): `genq run`, `genq estimate`
    and `genq-worker check` all read it."""
    import subprocess
    import sys

    from tests.cluster import REPO, env_for

    own = tmp_path / "my-model.yaml"
    own.write_text(
        "# my own model: here the tiny one, built offline\ntiny: true\n"
        "generation: {max_new_tokens: 4}\nlimits: {max_new_tokens: 64, context_length: 256}\n"
    )
    src = write(tmp_path, [anthropic_line("a", {"messages": USER, "max_tokens": 3})])
    out = tmp_path / "out.jsonl"
    run_genq(None, "run", str(src), "-o", str(out), "--profile", str(own), env=ONE_THREAD)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    check_anthropic_row(row, anthropic_line("a", {"messages": USER, "max_tokens": 3}))
    manifest = json.loads((tmp_path / "out.jsonl.genq").read_text().splitlines()[0])
    assert manifest["profile"] == "my-model" and manifest["format"] == "anthropic"
    estimate = json.loads(run_genq(None, "estimate", str(src), "--profile", str(own), "--json").stdout)
    assert estimate["items"] == 1
    check = subprocess.run(
        [sys.executable, "-m", "worker.main", "check", "--profile", str(own), "--max-new-tokens", "2"],
        cwd=REPO,
        env=env_for(None, **ONE_THREAD),
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert json.loads(check.stdout.splitlines()[-1])["sample"]["completion_tokens"] == 2
    prefetch = subprocess.run(
        [sys.executable, "-m", "worker.main", "prefetch", "--profile", str(own)],
        cwd=REPO,
        env=env_for(None, **ONE_THREAD),
        capture_output=True,
        text=True,
        check=False,
    )
    assert prefetch.returncode == 0, prefetch.stderr[-2000:]
    assert json.loads(prefetch.stdout.splitlines()[-1])["profile"] == "my-model"


def test_json_output_in_every_dialect_and_text_parts_in_native(tmp_path: Path) -> None:
    """Anthropic's beta ``output_format`` reads like ``output_config.format``; the Responses API's
    ``json_object`` like chat's; native messages take text parts like the hosted APIs."""
    schema = SCHEMAS["label"]
    beta = anthropic_line("a", {"messages": USER, "output_format": {"type": "json_schema", "schema": schema}})
    ga = anthropic_line(
        "a", {"messages": USER, "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    )
    (x,) = read_items(write(tmp_path, [beta], "beta.jsonl")).items
    (y,) = read_items(write(tmp_path, [ga], "ga.jsonl")).items
    assert x.params == y.params and x.params.response_format is not None
    assert x.params.response_format.target_schema() == schema
    obj = responses_line("r", {"input": "x", "text": {"format": {"type": "json_object"}}})
    (z,) = read_items(write(tmp_path, [obj], "obj.jsonl")).items
    assert z.params.response_format is not None and z.params.response_format.type == "json_object"
    native = {
        "id": "n",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ],
    }
    (n,) = read_items(write(tmp_path, [native], "native.jsonl")).items
    assert n.messages == [Message(role="user", content="a\nb")] and n.api is None


def test_stop_string_is_the_one_the_text_was_cut_at() -> None:
    """Anthropic's ``stop_sequence``: the stop string whose first occurrence ends the text."""
    from worker.core.states import FinishReason
    from worker.engine.sampling import result_text, stop_string

    def letters(ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)

    eos = frozenset({25})
    tokens = [0, 1, 2, 3, 4, 25]  # "abcde" then the end-of-sequence token
    assert stop_string(tokens, eos=eos, stops=["de", "bc", "x"], decode=letters) == "bc"
    text, reason = result_text(tokens, FinishReason.STOP, eos=eos, stops=["de", "bc", "x"], decode=letters)
    assert (text, reason) == ("a", FinishReason.STOP)
    assert stop_string(tokens, eos=eos, stops=["x"], decode=letters) is None
    assert stop_string(tokens, eos=eos, stops=None, decode=letters) is None
