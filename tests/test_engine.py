"""The engine on the real tiny model: batching, sampling, stops, errors, OOM back-off."""

from __future__ import annotations

import pytest

from worker.core.schema import GenParams, Item, Message
from worker.core.settings import Settings
from worker.engine import PACKED_MAX_ROWS, Engine

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
            from worker.core.errors import OutOfMemory

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


# --- continuous batching, the plain loop, packed weights, the batch-size search ------------------


def _varied(n: int = 11) -> list[Item]:
    """More items than rows, with different lengths and budgets: rows finish at different steps
    and freed rows are refilled from the queue."""
    words = "the patient has a fever and a cough since monday , dose of aspirin".split()
    return [
        Item(
            index=i,
            id=f"v{i}",
            prompt=" ".join(words[: 1 + (i * 5) % len(words)]),
            params=GenParams(max_new_tokens=2 + (i * 7) % 13),
        )
        for i in range(n)
    ]


def test_refilled_rows_give_the_same_text_as_one_by_one(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, max_batch_size=3, ignore_eos=True)
    assert engine.attention in ("sdpa", "eager")  # the slot-cache path is the one under test
    batch = engine.generate(_varied())
    alone = [engine.generate([it])[0] for it in _varied()]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.usage.completion_tokens for r in batch] == [it.params.max_new_tokens for it in _varied()]


def test_seeded_sampling_survives_refills(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    sampled = [
        it.model_copy(
            update={"params": it.params.model_copy(update={"temperature": 0.9, "seed": 7 + it.index})}
        )
        for it in _varied()
    ]
    engine = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    together = engine.generate(sampled)
    alone = [engine.generate([it])[0] for it in sampled]
    assert [r.text for r in together] == [r.text for r in alone]


def test_plain_loop_matches_the_slot_cache(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    fast = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    plain = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    plain.attention = None  # what a sliding-window or flash-attention model gets
    assert [r.text for r in plain.generate(_varied())] == [r.text for r in fast.generate(_varied())]


def test_packed_linear_reproduces_nn_linear() -> None:
    import torch

    from worker.engine import PackedLinear, pack_linear_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = model(x)
        packed = pack_linear_weights(model)
        if not packed:
            pytest.skip("this torch build has no oneDNN linear packing")
        assert packed == 2 and all(isinstance(m, PackedLinear) for m in (model[0], model[2]))
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)  # few rows: packed path
        # the crossover was measured, and is at least the fallback; past it, the BLAS path
        assert all(m.packed_max_rows >= PACKED_MAX_ROWS for m in (model[0], model[2]))
        big = torch.randn(600, 64)
        plain = torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(big, model[0].weight, model[0].bias)), model[2].weight
        )
        for limit in (1 << 30, 599):  # 600 rows through the packed weight, then through BLAS
            model[0].packed_max_rows = model[2].packed_max_rows = limit
            torch.testing.assert_close(model(big), plain, atol=1e-4, rtol=1e-4)
        assert pack_linear_weights(model) == 2  # idempotent


def test_packed_crossover_is_measured_per_size() -> None:
    """The crossover is the largest probed size at which the packed weight won (never below the
    decode-sized fallback), or no limit when it won at every probe.  A scripted clock decides who
    wins; the products it times are real."""
    import torch

    from worker.engine import PackedLinear, pack_linear_weights, packed_crossover

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with torch.inference_mode():
        if not pack_linear_weights(model):
            pytest.skip("this torch build has no oneDNN linear packing")
    layer = model[0]
    assert isinstance(layer, PackedLinear)

    def clock(packed_wins_up_to: int):  # type: ignore[no-untyped-def]
        def timer(fn) -> float:  # type: ignore[no-untyped-def]
            rows = fn().shape[0]  # runs the product; its row count says which probe this is
            is_packed = "packed" in fn.__name__
            return 1.0 if is_packed == (rows <= packed_wins_up_to) else 2.0

        return timer

    probes = (512, 1024, 2048)
    assert packed_crossover(layer, probes, timer=clock(1024)) == 1024
    assert packed_crossover(layer, probes, timer=clock(0)) == PACKED_MAX_ROWS
    assert packed_crossover(layer, probes, timer=clock(10**9)) > 2048
    assert packed_crossover(layer, probes) >= PACKED_MAX_ROWS  # the real clock


def test_batch_size_search_stops_when_bigger_stops_paying() -> None:
    from worker.engine import pick_batch_size, search_batch_sizes

    rates = {4: 100.0, 8: 180.0, 16: 300.0, 32: 305.0, 64: 290.0, 128: 400.0}
    asked: list[int] = []

    def measure(size: int) -> float:
        asked.append(size)
        return rates[size]

    table = search_batch_sizes(list(rates), measure)
    assert asked == [4, 8, 16, 32, 64]  # 32 and 64 did not beat 300 by 2%: 128 is never tried
    assert pick_batch_size(table) == 16  # smallest within 95% of the best (305)
    assert pick_batch_size({}) > 0


def test_batch_size_search_stops_at_out_of_memory() -> None:
    from worker.core.errors import OutOfMemory
    from worker.engine import search_batch_sizes

    def measure(size: int) -> float:
        if size >= 16:
            raise OutOfMemory("injected")
        return float(size)

    assert search_batch_sizes([4, 8, 16, 32], measure) == {4: 4.0, 8: 8.0}
    with pytest.raises(ValueError):
        search_batch_sizes([4], lambda size: (_ for _ in ()).throw(ValueError("not memory")))


def test_autotune_measures_once_and_caches(loaded_fp32, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path)
    first = Engine(loaded_fp32, settings=settings)
    chosen = first.autotune(candidates=(1, 2, 4), context=16, steps=2)
    assert chosen in (1, 2, 4) and first.max_batch_size == chosen
    assert first.autotuned is not None and first.autotuned["cached"] is False
    assert set(first.autotuned["tokens_per_second"]) <= {"1", "2", "4"}
    assert (tmp_path / "autotune.json").exists()
    again = Engine(loaded_fp32, settings=settings)
    assert again.autotune(candidates=(1, 2, 4), context=16, steps=2) == chosen
    assert again.autotuned is not None and again.autotuned["cached"] is True
    # the tuned size is what generate uses
    assert again.batch_limit() == chosen and all(r.ok for r in again.generate(items(max_new_tokens=3)))
