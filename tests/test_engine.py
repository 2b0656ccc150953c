"""The engine on the real tiny model: batching, sampling, stops, errors, OOM back-off."""

from __future__ import annotations

import pytest

from worker.core.schema import GenParams, Item, Message
from worker.core.settings import Settings
from worker.engine import Engine, build_engine
from worker.engine.faults import FaultyEngine

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
    text, templated = engine.prompts.render(
        Item(index=0, id="p", prompt="fever?"), system_prompt="you are a doctor"
    )
    assert templated and "you are a doctor" in text and "fever?" in text


def test_injected_oom_halves_the_batch_and_completes(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = build_engine(loaded_fp32, max_batch_size=8, settings=Settings(fault_oom_above=2))
    assert isinstance(engine, FaultyEngine)
    assert type(build_engine(loaded_fp32, max_batch_size=8, settings=Settings())) is Engine  # no switch
    clean = Engine(loaded_fp32, max_batch_size=8).generate(items(max_new_tokens=8))
    results = engine.generate(items(max_new_tokens=8))
    assert all(r.ok for r in results)
    assert [r.text for r in results] == [r.text for r in clean]
    assert engine.oom_ceiling == 2 and engine.batch_limit() == 2


def test_oom_with_one_item_records_that_item(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    class AlwaysOOM(Engine):  # any micro-batch holding i3 runs out of memory, even alone
        def run_batch(self, batch, rows, attempts, emit, should_stop=None):  # type: ignore[no-untyped-def]
            from worker.core.errors import OutOfMemory

            if any(p.item.id == "i3" for p in batch):
                raise OutOfMemory("injected for i3")
            return super().run_batch(batch, rows, attempts, emit, should_stop)

    oom = AlwaysOOM(loaded_fp32, max_batch_size=8)
    results = oom.generate(items(max_new_tokens=4))
    assert {r.id for r in results if not r.ok} == {"i3"}
    assert next(r for r in results if r.id == "i3").error_type == "out_of_memory"


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


# --- decode attention over each row's live span ------------------------------------------------


def test_live_chunks_cover_every_row_and_split_far_apart_lengths() -> None:
    from worker.engine.attention import Chunk, live_chunks

    assert live_chunks([]) == []
    assert live_chunks([7, 7, 7]) == [Chunk(0, 3, 7, True)]  # one length: one call, no mask
    lengths = [200, 198, 190, 150, 100, 100, 99, 20, 300]
    chunks = live_chunks(lengths, overhead=96)
    assert [(c.lo, c.hi) for c in chunks] == [(0, 4), (4, 8), (8, 9)]
    assert [c.span for c in chunks] == [200, 100, 300] and [c.exact for c in chunks] == [False] * 2 + [True]
    # no overhead: a call per length, each over exactly its rows' keys (equal neighbours share one)
    assert live_chunks([5, 3, 3, 9], overhead=0) == [
        Chunk(0, 1, 5, True),
        Chunk(1, 3, 3, True),
        Chunk(3, 4, 9, True),
    ]
    for overhead in (0, 10, 96, 10**9):  # every row in exactly one run, each within its run's span
        chunks = live_chunks(lengths, overhead)
        assert [r for c in chunks for r in range(c.lo, c.hi)] == list(range(len(lengths)))
        assert all(max(lengths[c.lo : c.hi]) == c.span for c in chunks)


def _far_apart() -> list[Item]:
    """Rows whose lengths differ by far more than a run's overhead, with different budgets: the
    decode passes hold several runs, and rows leave and are refilled."""
    words = "the patient has a fever and a cough since monday , dose of aspirin".split()
    sizes = [2, 120, 5, 60, 1, 90, 30, 3]
    return [
        Item(
            index=i,
            id=f"f{i}",
            prompt=" ".join((words * 20)[:n]),
            params=GenParams(max_new_tokens=3 + (i * 5) % 11),
        )
        for i, n in enumerate(sizes)
    ]


def test_live_span_attention_changes_no_token(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    """Greedy text with decode attention per run of rows (each over its own span) equals the text
    with every row attending up to the longest row, and HF's own forward (the plain loop, a
    DynamicCache); and the runs really happened, several per pass, through the engine's own pass
    and through transformers' pass alike."""
    from transformers import AttentionInterface

    from worker.engine import attention, llama

    runs: list[int] = []
    own_runs: list[int] = []

    def counting(module, query, key, value, mask, slot_chunks=None, **kw):  # type: ignore[no-untyped-def]
        if slot_chunks:
            runs.append(len(slot_chunks))
        return attention.slot_attention(module, query, key, value, mask, slot_chunks=slot_chunks, **kw)

    def own_counting(query, keys, values, visible, chunks, scale):  # type: ignore[no-untyped-def]
        own_runs.append(len(chunks))
        return attention.chunked_attention(query, keys, values, visible, chunks, scale)

    attention.register()
    AttentionInterface.register(attention.SLOT_ATTENTION, counting)
    llama.chunked_attention = own_counting  # type: ignore[assignment]
    engine = Engine(loaded_fp32, max_batch_size=5, ignore_eos=True)
    engine.forward.live_span = True  # whatever GENQ_LIVE_SPAN_ATTENTION says
    assert engine.forward.own is not None
    hf = Engine(loaded_fp32, max_batch_size=5, ignore_eos=True)
    hf.forward.live_span, hf.forward.own = True, None
    try:
        live = [r.text for r in engine.generate(_far_apart())]
        assert live == [r.text for r in hf.generate(_far_apart())]
    finally:
        AttentionInterface.register(attention.SLOT_ATTENTION, attention.slot_attention)
        llama.chunked_attention = attention.chunked_attention
    assert runs and max(runs) >= 3, runs
    assert own_runs and max(own_runs) >= 3, own_runs
    span = Engine(loaded_fp32, max_batch_size=5, ignore_eos=True)
    span.forward.live_span = False
    plain = Engine(loaded_fp32, max_batch_size=5, ignore_eos=True)
    plain.attention = None
    assert live == [r.text for r in span.generate(_far_apart())]
    assert live == [r.text for r in plain.generate(_far_apart())]
    assert loaded_fp32.model.config._attn_implementation == "sdpa"  # set back after each pass
