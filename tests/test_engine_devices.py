"""Device bookkeeping, as far as a CPU-only machine can check it: each layer's KV slots where that
layer runs (here: the CPU and ``meta``), inputs on the embedding's device, and the engine on a model
whose decoder layer is offloaded by accelerate (weights on ``meta``, run through a hook)."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import torch

from tests.helpers import hf_greedy
from worker.core.schema import GenParams, Item
from worker.engine import Engine
from worker.engine.forward import input_device, module_device
from worker.engine.slot_cache import SlotCache


def kv(rows: int, tokens: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones((rows, 2, tokens, 4), device=device, dtype=dtype)


def test_each_layer_gets_its_slots_on_its_own_device() -> None:
    cache = SlotCache(rows=3, capacity=8)
    _, visible = cache.begin_prefill(0, [0, 0, 0], [2, 3, 1], width=3)
    assert visible.shape == (3, 1, 3, 3) and visible.device.type == "cpu"
    k0, _ = cache.update(kv(3, 3, "cpu"), kv(3, 3, "cpu"), 0)
    k1, v1 = cache.update(kv(3, 3, "meta", torch.bfloat16), kv(3, 3, "meta", torch.bfloat16), 1)
    assert [k.device.type for k in cache.key_slots] == ["cpu", "meta"]
    assert [v.dtype for v in cache.value_slots] == [torch.float32, torch.bfloat16]
    assert k0.device.type == "cpu" and k1.device.type == "meta" and v1.shape == (3, 2, 3, 4)
    assert set(cache._write_on) == {torch.device("cpu"), torch.device("meta")}  # indices per device
    assert cache.lengths == [2, 3, 1]
    # the CPU layer holds each row unpadded from position 0; padding went past the capacity
    assert cache.key_slots[0][:, 0, :, 0].tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0, 1],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    positions, visible = cache.begin_decode(2)
    assert positions.tolist() == [[2], [3]] and visible.shape == (2, 1, 1, 4)
    cache._write_on.clear()
    k1, _ = cache.update(kv(2, 1, "meta", torch.bfloat16), kv(2, 1, "meta", torch.bfloat16), 1)
    assert k1.device.type == "meta" and k1.shape == (2, 2, 4, 4)
    assert list(cache._write_on) == [torch.device("meta")]


def test_inputs_go_where_the_embedding_runs() -> None:
    embedding = torch.nn.Embedding(10, 4)
    assert module_device(embedding).type == "cpu"
    embedding.to("meta")
    assert module_device(embedding).type == "cpu"  # weights on meta: not where it runs
    embedding._hf_hook = types.SimpleNamespace(execution_device=1)  # what accelerate's hook holds
    assert module_device(embedding) == torch.device("cuda:1")  # named, never initialised here

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 10)
            self.embed = embedding

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

    assert input_device(Model()) == torch.device("cuda:1")  # not the output head's CPU


def test_engine_runs_a_model_with_an_offloaded_layer(loaded_fp32, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Layer 1 offloaded to disk by accelerate: its weights sit on ``meta`` and a hook runs it on
    the CPU.  The engine's greedy text equals HF ``generate`` on that same model."""
    from transformers import AutoModelForCausalLM

    from worker.model.loading import resolve_sources

    base = resolve_sources(loaded_fp32.profile).base
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)
    )
    assert next(model.model.layers[1].parameters()).device.type == "meta"
    loaded = replace(loaded_fp32, model=model, adapter="none")
    engine = Engine(loaded, max_batch_size=4, ignore_eos=True)
    assert engine.attention and engine.device.type == "cpu"
    prompts = ["the patient has a fever", "dose of aspirin", "a", "blood pressure was 140 / 90 mmHg ."]
    items = [
        Item(index=i, id=str(i), prompt=p, params=GenParams(max_new_tokens=6)) for i, p in enumerate(prompts)
    ]
    got = [r.text for r in engine.generate(items)]
    want = hf_greedy(model, loaded.tokenizer, prompts, 6)
    assert got == want
