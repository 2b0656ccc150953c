"""GPU-only checks (marked ``gpu``; skipped without CUDA).  Run them where a GPU is lent:
``pytest -m gpu``."""

from __future__ import annotations

import pytest

from tests.helpers import hf_greedy

pytestmark = pytest.mark.gpu


def test_auto_mode_is_nf4_on_the_gpu(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from worker.model.capability import probe
    from worker.model.loading import load_model

    facts = probe()
    assert facts.gpus and facts.bnb_cuda, f"CUDA visible but bitsandbytes' CUDA backend is not: {facts.notes}"
    loaded = load_model(tiny_profile, "auto", facts=facts)
    assert loaded.mode == "nf4" and loaded.device == "cuda"
    assert loaded.placement["gpu"] == 2 and loaded.placement["cpu"] == 0
    assert loaded.quantized_linear_layers == 14 and loaded.adapter == "unmerged"
    assert loaded.extra["cuda_allocated_bytes"] > 0


def test_nf4_generation_on_the_gpu_is_batch_independent(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from worker.core.schema import GenParams, Item
    from worker.engine import Engine
    from worker.model.loading import load_model

    engine = Engine(load_model(tiny_profile, "nf4"), max_batch_size=8)
    items = [
        Item(index=i, id=str(i), prompt=p, params=GenParams(max_new_tokens=8))
        for i, p in enumerate(["fever", "the patient has a cough", "dose of aspirin"])
    ]
    batch = engine.generate(items)
    assert all(r.ok and r.usage.completion_tokens > 0 for r in batch)
    assert [r.text for r in batch] == [engine.generate([it])[0].text for it in items]


def test_probe_does_not_initialise_cuda_in_this_process() -> None:
    import torch

    from worker.model.capability import probe

    probe()
    assert not torch.cuda.is_initialized(), "probe must leave CUDA alone (the process may fork)"


# --- the engine's device handling on a real GPU (issue 13, point 4) ------------------------------


def _decoder_layers(model):  # type: ignore[no-untyped-def]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def _slot_devices(engine):  # type: ignore[no-untyped-def]
    """One prefill pass of two rows into a fresh slot cache: the device and dtype of each layer's
    slots, next to the device each decoder layer runs on."""
    import torch

    from worker.engine.forward import module_device
    from worker.engine.slot_cache import SlotCache

    cache = SlotCache(rows=2, capacity=16)
    positions, visible = cache.begin_prefill(0, [0, 0], [3, 2], width=3)
    with torch.inference_mode():
        engine.forward(torch.tensor([[5, 6, 7], [0, 8, 9]]), visible, positions, cache, last_only=True)
    got = [(k.device, k.dtype) for k in cache.key_slots]
    where = [module_device(layer) for layer in _decoder_layers(engine.model)]
    return got, where


def _hf_greedy(loaded, prompts: list[str], new_tokens: int) -> list[str]:  # type: ignore[no-untyped-def]
    return hf_greedy(loaded.model, loaded.tokenizer, prompts, new_tokens)


PROMPTS = ["fever", "the patient has a cough since monday", "dose of aspirin for an adult ?", "a"]


def _items(new_tokens: int):  # type: ignore[no-untyped-def]
    from worker.core.schema import GenParams, Item

    return [
        Item(index=i, id=str(i), prompt=p, params=GenParams(max_new_tokens=new_tokens))
        for i, p in enumerate(PROMPTS)
    ]


def test_nf4_fully_on_the_gpu_keeps_kv_on_the_gpu_and_matches_generate(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    import torch

    from worker.engine import Engine
    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "nf4")
    engine = Engine(loaded, max_batch_size=4, ignore_eos=True)
    assert engine.device.type == "cuda"
    slots, where = _slot_devices(engine)
    assert all(d.type == "cuda" for d in where)
    assert [d for d, _ in slots] == where
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert {dt for _, dt in slots} == {compute}
    one_by_one = Engine(loaded, max_batch_size=1, ignore_eos=True)
    assert [r.text for r in one_by_one.generate(_items(8))] == _hf_greedy(loaded, PROMPTS, 8)
    assert [r.text for r in engine.generate(_items(8))] == [r.text for r in one_by_one.generate(_items(8))]


def test_compute_dtype_is_bf16_where_the_gpu_has_it_else_fp16(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    import torch

    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "nf4")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    layer = _decoder_layers(loaded.model)[0].mlp.up_proj
    base = getattr(layer, "base_layer", layer)  # the LoRA wrapper keeps the 4-bit layer inside
    assert base.compute_dtype == want
    assert loaded.model.dtype == want


def test_nf4_offloaded_to_the_cpu_matches_generate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The seed case: a GPU too small for the model.  ``max_memory`` (from the GPU facts) leaves
    room for about half the layers; the rest are offloaded to the CPU (``llm_int8_enable_fp32_cpu_offload``;
    accelerate's hooks decide where an offloaded layer executes).  Each layer's KV must be where that
    layer runs, and the text equal to HF ``generate`` on the same loaded model."""
    from dataclasses import replace

    from worker.core.profiles import load_profile
    from worker.engine import Engine
    from worker.model.capability import estimate, probe
    from worker.model.loading import load_model
    from worker.model.tiny import TINY, ensure_model

    spec = replace(TINY, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8)
    built = ensure_model(spec, home=tmp_path)
    (tmp_path / "p.yaml").write_text(f"name: offload\nbase: {built.base}\nadapter: {built.adapter}\n")
    profile = load_profile(tmp_path / "p.yaml")
    facts = probe()
    need = estimate(built.base, built.adapter).nf4_bytes
    budget = int(need * 0.5 / (1 - profile.nf4.kv_cache_headroom))
    gpu = replace(facts.gpus[0], total_bytes=budget, free_bytes=budget)
    loaded = load_model(profile, "nf4", facts=replace(facts, gpus=(gpu,)))
    assert loaded.placement["gpu"] > 0 and loaded.placement["cpu"] > 0, loaded.placement
    engine = Engine(loaded, max_batch_size=4, ignore_eos=True)
    slots, where = _slot_devices(engine)
    assert [d for d, _ in slots] == where, (slots, where)  # each layer's KV where that layer runs
    one_by_one = Engine(loaded, max_batch_size=1, ignore_eos=True)
    assert [r.text for r in one_by_one.generate(_items(8))] == _hf_greedy(loaded, PROMPTS, 8)
    assert [r.text for r in engine.generate(_items(8))] == [r.text for r in one_by_one.generate(_items(8))]


def test_a_real_cuda_out_of_memory_halves_the_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ballast fills the GPU but for room for three rows of a large slot cache: the allocation for 8
    rows and then 4 fails in CUDA; the engine halves to 2 and every item completes."""
    import structlog
    import torch

    from worker.core.profiles import load_profile
    from worker.core.schema import GenParams, Item
    from worker.engine import Engine
    from worker.model.loading import load_model
    from worker.model.tiny import TINY, ensure_model

    capacity = 1 << 22
    built = ensure_model(TINY, home=tmp_path)
    (tmp_path / "p.yaml").write_text(
        f"name: cuda-oom\nbase: {built.base}\nadapter: {built.adapter}\n"
        f"limits:\n  max_new_tokens: {capacity}\n  context_length: {2 * capacity}\n"
        f"engine:\n  max_batch_size: 8\n  max_batch_tokens: {16 * capacity}\n"
    )
    loaded = load_model(load_profile(tmp_path / "p.yaml"), "nf4")
    engine = Engine(loaded)
    stops = ["e", "a", "o", "i", " ", "u", "s", "t", "r", "n", "l", "p", "d", "h", "m", "c"]
    params = GenParams(max_new_tokens=capacity - 16, stop=stops)
    items = [Item(index=i, id=str(i), prompt=f"{p} {i}", params=params) for i, p in enumerate(PROMPTS * 2)]
    engine.generate(items[:1])  # warm-up: one row of this capacity fits
    cfg = loaded.model.config
    element = torch.finfo(loaded.model.dtype).bits // 8
    per_row = (
        cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    )
    per_row *= (capacity + 1) * element
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(0, free - 3 * per_row - (256 << 20)), dtype=torch.uint8, device="cuda")
    try:
        with structlog.testing.capture_logs() as events:
            results = engine.generate(items)
    finally:
        del ballast
        torch.cuda.empty_cache()
    backoff = [(e["rows"], e["new_limit"]) for e in events if e["event"] == "oom_backoff"]
    assert backoff[:2] == [(8, 4), (4, 2)], events
    assert all("out of memory" in e["error"].lower() for e in events if e["event"] == "oom_backoff")
    assert all(r.ok for r in results) and engine.oom_ceiling == 2
