"""The engine's own Llama-family pass (worker/engine/llama.py): transformers' logits bit for bit,
greedy text equal to HF generate, and transformers' pass wherever it does not fit."""

from __future__ import annotations

import pytest
import torch

from worker.core.schema import GenParams, Item
from worker.core.settings import Settings
from worker.engine import Engine, SlotCache, build_engine
from worker.engine.forward import Forward
from worker.engine.llama import LlamaPass, llama_pass
from worker.engine.prefix import PrefixKV


def _passes(fwd: Forward, vocab: int, seed: int) -> list[torch.Tensor]:
    """Logits of two prefills (one long row; three rows of different lengths, left-padded) and of
    four decode steps in two runs of rows (the long row alone, the short ones under a mask)."""
    gen = torch.Generator().manual_seed(seed)
    cache = SlotCache(4, 256)
    out = []
    ids = torch.randint(0, vocab, (1, 200), generator=gen)  # a long row: runs of different spans
    positions, visible = cache.begin_prefill(0, [0], [200], 200)
    out.append(fwd(ids, visible, positions, cache, last_only=True))
    ids = torch.randint(0, vocab, (3, 9), generator=gen)
    positions, visible = cache.begin_prefill(1, [0, 0, 0], [9, 4, 1], 9)
    out.append(fwd(ids, visible, positions, cache, last_only=True))
    for _ in range(4):
        positions, visible = cache.begin_decode(4)
        assert cache.chunks is not None and len(cache.chunks) > 1
        step = torch.randint(0, vocab, (4, 1), generator=gen)
        out.append(fwd(step, visible, positions, cache))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_the_own_pass_gives_transformers_logits_bit_for_bit(tiny_profile, packed: bool) -> None:  # type: ignore[no-untyped-def]
    """Prefill (padded rows, last position only) and decode steps (runs of rows over their own
    spans, and every row over the longest span) through the own pass equal transformers' pass
    over the same slot cache exactly (torch.equal), on plain and on packed, fused weights."""
    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "fp32")
    if packed:
        build_engine(loaded, settings=Settings(threads=2), autotune=False, max_batch_size=4)
    model, vocab = loaded.model, int(loaded.model.config.vocab_size)
    own = llama_pass(model)
    assert isinstance(own, LlamaPass)
    fwd = Forward(model, pad_id=0)
    real = LlamaPass.__call__
    with torch.inference_mode():
        for live in (True, False):
            fwd.live_span = live
            fwd.own = None
            want = _passes(fwd, vocab, seed=int(live))
            fwd.own = own
            calls = 0

            def counted(self, *a, **k):  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                return real(self, *a, **k)

            LlamaPass.__call__ = counted  # type: ignore[method-assign]
            try:
                got = _passes(fwd, vocab, seed=int(live))
            finally:
                LlamaPass.__call__ = real  # type: ignore[method-assign]
            assert calls == len(want)  # every pass ran through the own pass
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                assert torch.equal(a, b), (live, i, (a - b).abs().max())


def _prefix(fwd: Forward, ids: torch.Tensor) -> PrefixKV:
    """The keys and values of ``ids`` ``[1, n]`` computed alone, as a shared prefix."""
    cache = SlotCache(1, ids.shape[1])
    positions, visible = cache.begin_prefill(0, [0], [ids.shape[1]], ids.shape[1])
    fwd(ids, visible, positions, cache, last_only=True)
    layers = [cache.layer(i, 0) for i in range(len(cache.key_slots))]
    return PrefixKV(tuple(ids[0].tolist()), [k.clone() for k, _ in layers], [v.clone() for _, v in layers])


@pytest.mark.parametrize("packed", [False, True])
def test_a_packed_prefill_gives_each_row_what_it_gets_alone_bit_for_bit(tiny_profile, packed: bool) -> None:  # type: ignore[no-untyped-def]
    """Rows end to end with no padding (one of them after a shared prefix) give the logits and
    the slot contents each row gets prefilled alone through transformers' pass: exactly on packed
    weights (oneDNN's product computes each row alike whatever the others), to BLAS's rounding on
    plain ones (its result for a row depends on how many rows it multiplies: a row alone differs
    from the same row in a batch there, through any pass); and the decode steps after them too."""
    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "fp32")
    if packed:
        build_engine(loaded, settings=Settings(threads=2), autotune=False, max_batch_size=4)
    model, vocab = loaded.model, int(loaded.model.config.vocab_size)
    fwd = Forward(model, pad_id=0)
    own = llama_pass(model)
    assert own is not None
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        prefix = _prefix(fwd, torch.randint(0, vocab, (1, 6), generator=gen))
        rows = [torch.randint(0, vocab, (n,), generator=gen) for n in (30, 9, 4, 1)]
        starts, lengths = [0, prefix.length, 0, 0], [len(r) for r in rows]
        prefixes = [None, prefix, None, None]
        steps = [torch.randint(0, vocab, (5, 1), generator=gen) for _ in range(3)]
        alone, together = SlotCache(5, 64), SlotCache(5, 64)
        firsts = []
        for i, r in enumerate(rows):
            positions, visible = alone.begin_prefill(1 + i, [starts[i]], [len(r)], len(r), [prefixes[i]])
            firsts.append(fwd(r[None], visible, positions, alone, last_only=True))
        want = [torch.cat(firsts)]
        fwd.own = own
        assert fwd.packs
        positions, segments = together.begin_packed(1, starts, lengths, prefixes)
        assert positions.shape == (1, sum(lengths))
        got = [fwd.packed(torch.cat(rows)[None], positions, segments, together)]
        assert together.lengths == alone.lengths == [0, 30, 15, 4, 1]
        same = torch.equal if packed else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        for slot in range(1, 5):
            for layer in range(len(alone.key_slots)):
                assert all(map(same, alone.layer(layer, slot), together.layer(layer, slot))), (slot, layer)
        for step in steps:  # the rows decode on from either cache alike
            for cache, out in ((alone, want), (together, got)):
                cache.lengths[0] = 0
                positions, visible = cache.begin_decode(5)
                out.append(fwd(step, visible, positions, cache)[1:])
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert same(a, b), (i, (a - b).abs().max())


def _items() -> list[Item]:
    words = "the patient was given a dose of aspirin for the fever and pain".split()
    sizes = [3, 40, 7, 25, 1, 60, 12]
    return [
        Item(
            index=i, id=f"l{i}", prompt=" ".join((words * 10)[:n]), params=GenParams(max_new_tokens=4 + 3 * i)
        )
        for i, n in enumerate(sizes)
    ]


def test_greedy_text_is_the_same_with_and_without_the_own_pass(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    """Continuous batching (rows leaving and refilled, runs of different spans) gives the same
    greedy text through the own pass as through transformers' pass, and as transformers' plain
    loop (a DynamicCache, no slot cache at all)."""
    own = Engine(loaded_fp32, max_batch_size=3, ignore_eos=True)
    assert own.forward.own is not None
    hf = Engine(loaded_fp32, settings=Settings(own_pass=False), max_batch_size=3, ignore_eos=True)
    assert hf.forward.own is None
    plain = Engine(loaded_fp32, max_batch_size=3, ignore_eos=True)
    plain.attention = None
    texts = [r.text for r in own.generate(_items())]
    assert all(texts)
    assert texts == [r.text for r in hf.generate(_items())]
    assert texts == [r.text for r in plain.generate(_items())]


def test_the_own_pass_declines_what_it_does_not_compute(loaded_fp32, tiny_profile) -> None:  # type: ignore[no-untyped-def]
    """Another architecture, projections that are not plain linear layers (an unmerged LoRA, a
    4-bit layer), or weights off the CPU or in another dtype: transformers' pass."""
    from peft import LoraConfig, get_peft_model

    assert llama_pass(loaded_fp32.model) is not None
    assert llama_pass(torch.nn.Linear(2, 2)) is None
    from worker.model.loading import load_model

    other = load_model(tiny_profile, "fp32")
    other.model.config.model_type = "gemma"
    assert llama_pass(other.model) is None
    other.model.config.model_type = "qwen2"
    lora = get_peft_model(other.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert llama_pass(lora.base_model.model) is None
    half = load_model(tiny_profile, "fp32").model.to(torch.bfloat16)
    assert llama_pass(half) is None
