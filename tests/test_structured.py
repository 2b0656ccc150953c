"""Issue 14's done-when checks, through the real ``genq run`` on the tiny random model.

The tiny model's weights are random: whatever it writes inside a ``response_format`` is valid
because the constraint allows nothing else (a test below turns the constraint off and watches
the answers stop parsing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from tests.cluster import run_genq
from tests.schemas import NAMES, ONE_THREAD, SCHEMAS, request, schema_request


def run(tmp_path: Path, lines: list[str], *extra: str, name: str = "in") -> list[dict[str, Any]]:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / f"{name}.out.jsonl"
    # one thread: on a shared 2-core machine a second one mostly waits for the other processes
    run_genq(None, "run", str(src), "-o", str(out), "--profile", "tiny-random", *extra, env=ONE_THREAD)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_200_schema_requests_all_valid(tmp_path: Path) -> None:
    """Done when: 200 chat requests, four schemas mixed, through `genq run --format openai`: every
    `message.content` that ended with `stop` validates against its own schema, at least 95 % end
    with `stop`, the rest are `length` and flagged `json_valid: false`."""
    rows = run(tmp_path, [schema_request(i, max_tokens=96) for i in range(200)], "--format", "openai")
    assert len(rows) == 200
    stops = 0
    for i, row in enumerate(rows):
        assert row["custom_id"] == f"r{i:03d}" and row["error"] is None
        body = row["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == "tiny-random:tiny-random-lora"
        (choice,) = body["choices"]
        content = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            stops += 1
            assert choice["json_valid"] is True
            jsonschema.validate(json.loads(content), SCHEMAS[NAMES[i % len(NAMES)]])
        else:
            assert choice["finish_reason"] == "length" and choice["json_valid"] is False
    assert stops >= 190, f"only {stops} of 200 ended with stop"


def test_logprobs_and_n_openai_shaped(tmp_path: Path) -> None:
    """Done when: `logprobs: true, top_logprobs: 3` and `n: 3` give OpenAI-shaped output; `n: 3`
    with a seed gives the same three answers on a rerun."""
    chat = {
        "messages": [{"role": "user", "content": "what is the dose of aspirin ?"}],
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 3,
        "n": 3,
        "temperature": 1.0,
        "seed": 11,
    }
    completion = {"prompt": "blood pressure was", "max_tokens": 5, "logprobs": 2, "n": 2, "temperature": 0.8}
    lines = [request(0, chat), request(1, completion, url="/v1/completions")]
    first = run(tmp_path, lines, "--format", "openai", name="a")
    body = first[0]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) == 3, texts  # distinct seeds, distinct samples
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert content and len(content) <= 6
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
            assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
            best = entry["top_logprobs"][0]["logprob"]
            assert all(t["logprob"] <= best for t in entry["top_logprobs"])
            assert entry["logprob"] <= best + 1e-6
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])
    legacy = first[1]["response"]["body"]
    assert legacy["object"] == "text_completion" and len(legacy["choices"]) == 2
    lp = legacy["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(len(alternatives) == 2 for alternatives in lp["top_logprobs"])
    again = run(tmp_path, lines, "--format", "openai", name="b")
    assert [c["message"]["content"] for c in again[0]["response"]["body"]["choices"]] == texts
