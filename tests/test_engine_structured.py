"""The engine side of issue 14 on the tiny random model, in process: per-row JSON constraints
in mixed micro-batches, the schema cache, answers cut by max_tokens, penalties, n samples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch

from tests.schemas import QUESTIONS, SCHEMAS
from worker.core.outputs import result_row
from worker.core.schema import GenParams, Item, Message
from worker.core.structured import ResponseFormat
from worker.engine import Engine


@pytest.fixture(scope="module")
def engine(loaded_fp32: Any) -> Iterator[Engine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: a second thread mostly waits
    try:
        yield Engine(loaded_fp32, max_batch_size=8)
    finally:
        torch.set_num_threads(threads)


def schema_format(name: str) -> ResponseFormat:
    return ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}
    )


def item(i: int, fmt: ResponseFormat | None = None, **params: Any) -> Item:
    params.setdefault("max_new_tokens", 64)
    return Item(
        index=i,
        id=f"i{i}",
        messages=[Message(role="user", content=QUESTIONS[i % len(QUESTIONS)] + f" ({i})")],
        params=GenParams(response_format=fmt, **params),
    )


def test_mixed_batch_constrains_only_its_rows(engine: Engine) -> None:
    """Schema rows, json_object rows and plain rows in the same micro-batches (8 rows at a time):
    every constrained row that stopped is valid; plain rows are the model's free text."""
    names = list(SCHEMAS)
    formats: list[ResponseFormat | None] = [None, ResponseFormat(type="json_object")]
    formats += [schema_format(n) for n in names]
    items = [item(i, formats[i % len(formats)]) for i in range(18)]
    results = engine.generate(items)
    assert len({r.index for r in results}) == 18
    parsed_plain = 0
    for it, r in zip(items, results, strict=True):
        fmt = it.params.response_format
        if fmt is None:
            assert r.json_valid is None
            parsed_plain += _parses_object(r.text or "")
            continue
        assert r.json_valid == (r.finish_reason == "stop")
        if r.finish_reason == "stop":
            value = json.loads(r.text or "")
            assert isinstance(value, dict)
            jsonschema.validate(value, fmt.target_schema())
    assert parsed_plain == 0


def _parses_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_schemas_compiled_once_per_worker(engine: Engine) -> None:
    constraints = engine.rules.shaper.constraints  # type: ignore[union-attr]
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "fresh", "schema": {"type": "boolean"}}}
    )
    before = constraints.compiles
    engine.generate([item(i, fmt, max_new_tokens=4) for i in range(6)])
    engine.generate([item(i, fmt, max_new_tokens=4) for i in range(6, 9)])
    assert constraints.compiles == before + 1


def test_without_the_constraint_the_random_model_writes_no_json(engine: Engine) -> None:
    """What makes the answers valid is the constraint: the same requests, unconstrained, give
    the random model's gibberish (so the validity tests above cannot pass by luck)."""
    shaper = engine.rules.shaper
    engine.rules.shaper = None
    try:
        results = engine.generate([item(i, schema_format("person")) for i in range(8)])
    finally:
        engine.rules.shaper = shaper
    assert not any(_parses_object(r.text or "") for r in results)


def test_cut_by_max_tokens_is_length_and_not_valid(engine: Engine) -> None:
    results = engine.generate([item(i, schema_format("record"), max_new_tokens=3) for i in range(4)])
    for r in results:
        assert r.finish_reason == "length" and r.json_valid is False
        with pytest.raises(ValueError):
            json.loads(r.text or "")


def test_n_samples_native_row_and_reproducible(engine: Engine) -> None:
    params = {"max_new_tokens": 5, "n": 3, "temperature": 1.0, "seed": 5}
    first = engine.generate([item(0, **params), item(1, max_new_tokens=3)])
    again = engine.generate([item(1, max_new_tokens=3), item(0, **params)])
    sampled = first[0]
    assert sampled.choices is not None and [c.index for c in sampled.choices] == [0, 1, 2]
    texts = [c.text for c in sampled.choices]
    assert len(set(texts)) == 3
    assert [c.text for c in again[1].choices or []] == texts
    assert sampled.text == texts[0]
    alone = engine.generate([item(0, max_new_tokens=5, temperature=1.0, seed=5)])[0]
    assert alone.text == texts[0]  # sample 0 keeps the item's seed
    row = result_row(sampled, None, "native", model="x")
    assert "text" not in row and len(row["choices"]) == 3
    assert row["usage"]["completion_tokens"] == sum(c.completion_tokens for c in sampled.choices)
    assert first[1].choices is None and first[1].text == again[0].text


def test_penalties_change_greedy_repetition(engine: Engine) -> None:
    plain = engine.generate([item(0, max_new_tokens=24)])[0]
    penalised = engine.generate([item(0, max_new_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)])[0]
    assert plain.text != penalised.text
    assert len(set(penalised.text or "")) >= len(set(plain.text or "")) - 2


def test_estimate_counts_prompt_tokens_as_the_worker_does(engine: Engine) -> None:
    """`genq estimate` tokenises without torch (tokenizers + the chat template in jinja2); its
    counts equal the engine's for prompts, chat messages and a system prompt."""
    from producer.tokens import PromptCounter
    from worker.model.files import model_files

    counter = PromptCounter(model_files(engine.loaded.profile).base)
    cases = [
        (Item(index=0, id="p", prompt="the patient has a history of chest pain"), None),
        (Item(index=1, id="c", messages=[Message(role="user", content="what is the dose ?")]), None),
        (item(2), "Answer in JSON."),
        (Item(index=3, id="s", prompt="fever , cough"), "be brief"),
    ]
    for it, system in cases:
        assert counter.count(it, system) == len(engine.prepare(it, None, system).ids)


def test_unenforceable_schema_is_the_items_error(engine: Engine) -> None:
    """Submit refuses such schemas; a hand-made item that carries one errors alone."""
    bad = ResponseFormat.model_validate(
        {
            "type": "json_schema",
            "json_schema": {"name": "bad", "schema": {"type": "string", "pattern": "(?<=a)b"}},
        }
    )
    results = engine.generate([item(0, bad), item(1, max_new_tokens=3)])
    assert results[0].status == "error" and results[0].error is not None
    assert results[0].error.type == "invalid_input" and "look-around" in results[0].error.message
    assert results[1].status == "ok"


def test_a_failed_matcher_allows_only_the_end(engine: Engine) -> None:
    """A matcher that took a token its grammar forbids (only a bug could do that) allows nothing
    but the end of the sequence, never a row of -inf to sample from; the row then ends with
    json_valid false (:meth:`Shaper.advance`)."""
    constraints = engine.rules.shaper.constraints  # type: ignore[union-attr]
    ok, failed = constraints.start(schema_format("person")), constraints.start(schema_format("person"))
    x = int(engine.tokenizer.convert_tokens_to_ids("x"))
    assert not failed.consume(x) and failed.error  # an answer must start with '{'
    logits = torch.zeros(2, constraints.vocab_size)
    constraints.mask(logits, [0, 1], [ok, failed])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and set(allowed) <= set(constraints.eos)
    brace = int(engine.tokenizer.convert_tokens_to_ids("{"))
    assert logits[0, brace] == 0 and logits[0, x] == float("-inf")
