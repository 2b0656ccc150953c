"""GPU-only checks (marked ``gpu``; skipped without CUDA).  Run them where a GPU is lent:
``pytest -m gpu``."""

from __future__ import annotations

import pytest

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
