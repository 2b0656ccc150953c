"""Shared-prefix reuse on the real tiny model: found without being told, computed once, and the
output token for token what it is without reuse."""

from __future__ import annotations

import pytest

from worker.core.schema import GenParams, Item, Message
from worker.engine import Engine
from worker.engine.prefix import PREFIX_MIN_TOKENS, PrefixCache, mark_shared_prefixes
from worker.engine.prompts import Prepared

SYSTEM = (
    "you are a careful medical assistant . answer in simple words , name the dose of aspirin for an "
    "adult when asked , and say when the patient should see a doctor about chest pain , fever , cough "
    "or shortness of breath ."
)
QUESTIONS = [
    "fever ?",
    "what is the dose of aspirin for an adult ?",
    "blood pressure was 140 / 90 mmHg .",
    "symptoms include fever , cough and fatigue",
    "explain the treatment options for type 2 diabetes",
    "chest pain",
    "a",
    "the patient has a history of chest pain and shortness of breath",
    "cough since monday",
    "what now ?",
]


def chat_items(**params) -> list[Item]:  # type: ignore[no-untyped-def]
    return [
        Item(index=i, id=f"q{i}", prompt=q, params=GenParams(max_new_tokens=10, **params))
        for i, q in enumerate(QUESTIONS)
    ]


def prep(ids: list[int]) -> Prepared:
    return Prepared(
        item=Item(index=0, id="x", prompt="x"), ids=ids, params=GenParams(), max_new=1, clipped=False
    )


def test_shared_prefixes_are_found_by_sorting() -> None:
    system = list(range(100, 140))  # 40 tokens
    group = [prep([*system, 1, 2]), prep([*system, 1, 3, 4]), prep([*system, 7]), prep(system)]
    other = [prep([5] * 50 + [1]), prep([9] * 60), prep([5] * 10 + [2])]  # [5]*10 shared: too short
    everything = [other[0], group[2], other[1], group[0], other[2], group[1], group[3]]
    assert mark_shared_prefixes(everything, min_tokens=32) == 4
    assert [p.prefix for p in group] == [40, 40, 40, 39]  # each keeps a token of its own
    assert [p.prefix for p in other] == [0, 0, 0]
    assert mark_shared_prefixes([group[0]]) == 0 and group[0].prefix == 0  # alone: nothing shared


def test_reuse_gives_the_same_tokens_as_no_reuse(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    reuse = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    plain = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    plain.reuse_prefixes = False
    got = reuse.generate(chat_items(), system_prompt=SYSTEM)
    want = plain.generate(chat_items(), system_prompt=SYSTEM)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.usage for r in got] == [r.usage for r in want]
    assert len(plain.prefixes) == 0
    # one prefix (the templated system prompt), computed once, used by every row
    assert len(reuse.prefixes) == 1 and reuse.prefixes.misses == 1
    assert reuse.prefixes.hits == len(QUESTIONS) - 1
    (entry,) = reuse.prefixes.entries()
    assert entry.length >= PREFIX_MIN_TOKENS
    # the next job with the same system prompt starts from the kept prefix
    again = reuse.generate(chat_items()[:3], system_prompt=SYSTEM)
    assert [r.text for r in again] == [r.text for r in want[:3]] and reuse.prefixes.misses == 1


def test_reuse_with_sampling_and_chat_messages(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    items = [
        Item(
            index=i,
            id=f"m{i}",
            messages=[Message(role="system", content=SYSTEM), Message(role="user", content=q)],
            params=GenParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=40 + i),
        )
        for i, q in enumerate(QUESTIONS)
    ]
    reuse = Engine(loaded_fp32, max_batch_size=3, ignore_eos=True)
    plain = Engine(loaded_fp32, max_batch_size=3, ignore_eos=True)
    plain.reuse_prefixes = False
    assert [r.text for r in reuse.generate(items)] == [r.text for r in plain.generate(items)]
    assert len(reuse.prefixes) == 1


def test_reused_prefix_alone_equals_one_by_one(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(loaded_fp32, max_batch_size=8, ignore_eos=True)
    together = engine.generate(chat_items(), system_prompt=SYSTEM)
    alone = [engine.generate([it], system_prompt=SYSTEM)[0] for it in chat_items()]
    assert [r.text for r in together] == [r.text for r in alone]


def test_prefix_cache_keeps_within_its_budget() -> None:
    import torch

    from worker.engine.prefix import PrefixKV

    def entry(first: int) -> PrefixKV:
        return PrefixKV(ids=(first, 1, 2), keys=[torch.zeros(2, 3, 4)], values=[torch.zeros(2, 3, 4)])

    cache = PrefixCache(max_bytes=2 * entry(0).nbytes)
    for n in range(3):
        cache.put(entry(n))
    assert len(cache) == 2 and cache.get((0, 1, 2)) is None and cache.get((2, 1, 2)) is not None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_reuse_under_both_attention_kinds(loaded_fp32, attention: str) -> None:  # type: ignore[no-untyped-def]
    reuse = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    plain = Engine(loaded_fp32, max_batch_size=4, ignore_eos=True)
    reuse.forward.attention = plain.forward.attention = attention  # the mask's form changes with it
    config = loaded_fp32.model.config
    before = config._attn_implementation
    try:
        config._attn_implementation = attention
        plain.reuse_prefixes = False
        got = reuse.generate(chat_items(), system_prompt=SYSTEM)
        assert [r.text for r in got] == [r.text for r in plain.generate(chat_items(), system_prompt=SYSTEM)]
    finally:
        config._attn_implementation = before
