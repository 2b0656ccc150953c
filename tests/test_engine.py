"""The engine on the real tiny model: batching, sampling, stops, errors, OOM back-off."""

from __future__ import annotations

import pytest

from worker.engine import Engine
from worker.schema import GenParams, Item, Message
from worker.settings import Settings

PROMPTS = [
    "the patient",
    "what is the dose of aspirin for an adult ?",
    "fever",
    "explain the treatment options for type 2 diabetes in simple words",
    "blood pressure was 140 / 90 mmHg .",
    "symptoms include fever , cough and fatigue",
    "a",
]


def items(**params) -> list[Item]:  # type: ignore[no-untyped-def]
    return [Item(index=i, id=f"i{i}", prompt=p, params=GenParams(**params)) for i, p in enumerate(PROMPTS)]


@pytest.fixture(params=["fp32", "nf4"])
def engine(request, loaded_fp32, loaded_nf4) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(loaded_fp32 if request.param == "fp32" else loaded_nf4, max_batch_size=8)


def test_batched_greedy_equals_one_by_one(engine: Engine) -> None:
    batch = engine.generate(items(max_new_tokens=12))
    alone = [engine.generate([it])[0] for it in items(max_new_tokens=12)]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert all(r.ok and r.usage.completion_tokens > 0 for r in batch)


def test_seeded_sampling_is_batch_independent(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, max_batch_size=8)
    sampled = [
        Item(
            index=i,
            id=f"s{i}",
            prompt=p,
            params=GenParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i),
        )
        for i, p in enumerate(PROMPTS)
    ]
    mixed = [*sampled, *items(max_new_tokens=5)[:3]]
    mixed = [it.model_copy(update={"index": n}) for n, it in enumerate(mixed)]
    batch = engine.generate(mixed)[: len(sampled)]
    alone = [engine.generate([it])[0] for it in sampled]
    assert [r.text for r in batch] == [r.text for r in alone]
    # a different seed gives a different text (sampling is really on)
    other = engine.generate(
        [sampled[1].model_copy(update={"params": GenParams(max_new_tokens=12, temperature=0.9, seed=999)})]
    )
    assert other[0].text != alone[1].text


def test_finish_reasons_and_usage(engine: Engine) -> None:
    results = engine.generate(items(max_new_tokens=6))
    for r, p in zip(results, PROMPTS, strict=True):
        assert r.finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens == len(engine.tokenizer(p)["input_ids"])
        if r.finish_reason == "length":
            assert r.usage.completion_tokens == 6


def test_stop_strings_are_trimmed(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32)
    free = engine.generate(items(max_new_tokens=16))[3]
    stop = free.text[5:8]
    assert len(stop) == 3
    stopped = engine.generate([items(max_new_tokens=16, stop=[stop, "never-there"])[3]])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.usage.completion_tokens < 16


def test_context_length_exceeded_is_isolated(engine: Engine) -> None:
    long_prompt = " ".join(["the patient has a history of chest pain"] * 80)
    batch = items(max_new_tokens=4)
    batch.insert(2, Item(index=99, id="long", prompt=long_prompt))
    results = engine.generate(batch)
    by_id = {r.id: r for r in results}
    assert by_id["long"].status == "error" and by_id["long"].error_type == "context_length_exceeded"
    assert "256" in by_id["long"].error.message  # type: ignore[union-attr]
    assert all(r.ok for r in results if r.id != "long")


def test_max_new_tokens_clipped_to_context_finishes_with_length(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32)
    prompt = " ".join(["fever"] * 250)
    n = len(engine.tokenizer(prompt)["input_ids"])
    assert n < 256
    r = engine.generate([Item(index=0, id="x", prompt=prompt, params=GenParams(max_new_tokens=200))])[0]
    assert r.ok and r.usage.completion_tokens <= 256 - n


def test_chat_messages_use_the_template(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32)
    msg = Item(
        index=0,
        id="m",
        messages=[Message(role="system", content="be brief"), Message(role="user", content="fever?")],
    )
    r = engine.generate([msg])[0]
    text = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fever?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert r.ok and r.usage.prompt_tokens == len(
        engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_system_prompt_is_added(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32)
    text, templated = engine.render(Item(index=0, id="p", prompt="fever?"), system_prompt="you are a doctor")
    assert templated and "you are a doctor" in text and "fever?" in text


def test_injected_oom_halves_the_batch_and_completes(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, max_batch_size=8, settings=Settings(fault_oom_above=2))
    clean = Engine(loaded_fp32, max_batch_size=8).generate(items(max_new_tokens=8))
    results = engine.generate(items(max_new_tokens=8))
    assert all(r.ok for r in results)
    assert [r.text for r in results] == [r.text for r in clean]
    assert engine.oom_ceiling == 2 and engine.batch_limit() == 2


def test_oom_with_one_item_records_that_item(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, settings=Settings(fault_oom_above=1))

    # with a ceiling of 1 nothing is over the limit; force it with a limit of 0 via a subclass
    class AlwaysOOM(Engine):
        def _run_batch(self, batch, attempts):  # type: ignore[no-untyped-def]
            from worker.errors import OutOfMemory

            if any(p.item.id == "i3" for p in batch):
                raise OutOfMemory("injected for i3")
            return super()._run_batch(batch, attempts)

    oom = AlwaysOOM(loaded_fp32, max_batch_size=8)
    results = oom.generate(items(max_new_tokens=4))
    assert {r.id for r in results if not r.ok} == {"i3"}
    assert next(r for r in results if r.id == "i3").error_type == "out_of_memory"
    del engine


def test_results_stream_per_micro_batch(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, max_batch_size=2)
    seen: list[int] = []
    engine.generate(items(max_new_tokens=3), on_results=lambda rs: seen.append(len(rs)))
    assert sum(seen) == len(PROMPTS) and max(seen) <= 2 and len(seen) >= 4
