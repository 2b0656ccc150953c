"""Real loading of the tiny model in both modes, through the same code as hub models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from worker.core.errors import ModelLoadError
from worker.model.loading import resolve_sources


def _logits(model, tokenizer, text: str = "the patient has a fever") -> torch.Tensor:  # type: ignore[no-untyped-def]
    enc = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits.float()


def test_fp32_merged_matches_base_plus_unmerged_adapter(loaded_fp32, tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert loaded_fp32.adapter == "merged" and loaded_fp32.mode == "fp32"
    assert not any("lora" in n for n, _ in loaded_fp32.model.named_parameters()), "adapter must be merged"
    src = resolve_sources(tiny_profile)
    base = AutoModelForCausalLM.from_pretrained(str(src.base), dtype=torch.float32).eval()
    base_logits = _logits(base, loaded_fp32.tokenizer)
    unmerged = PeftModel.from_pretrained(base, str(src.adapter)).eval()
    merged_logits = _logits(loaded_fp32.model, loaded_fp32.tokenizer)
    torch.testing.assert_close(merged_logits, _logits(unmerged, loaded_fp32.tokenizer), atol=1e-4, rtol=1e-4)
    # the adapter really changes the output
    assert (merged_logits - base_logits).abs().max().item() > 0.1


def test_nf4_on_cpu_has_linear4bit_with_double_quant_and_unmerged_adapter(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from bitsandbytes.nn import Linear4bit

    from worker.model.loading import load_model

    # a fresh load: bitsandbytes' CPU backend repacks the weights (dropping the nested constants)
    # on their first forward pass, so the shared fixture may already have run
    loaded_nf4 = load_model(tiny_profile, "nf4")
    layers = [m for m in loaded_nf4.model.modules() if isinstance(m, Linear4bit)]
    assert loaded_nf4.quantized_linear_layers == len(layers) == 14  # 7 linears x 2 layers
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.nested, "double quantisation: the absmax constants are quantised too"
    assert loaded_nf4.adapter == "unmerged"
    assert any("lora_A" in n for n, _ in loaded_nf4.model.named_parameters())
    assert loaded_nf4.summary()["quantized_linear_layers"] > 0


def test_estimate_close_to_measured(loaded_fp32, loaded_nf4) -> None:  # type: ignore[no-untyped-def]
    fp32 = loaded_fp32.summary()
    assert abs(fp32["weights_bytes"] - fp32["estimated_bytes"]) / fp32["estimated_bytes"] < 0.02
    nf4 = loaded_nf4.summary()
    # the tiny model is dominated by its (unquantised) embeddings, so allow a looser match
    assert abs(nf4["weights_bytes"] - nf4["estimated_bytes"]) / nf4["estimated_bytes"] < 0.25
    assert nf4["weights_bytes"] < fp32["weights_bytes"]


def test_tokenizer_pads_left_and_has_chat_template(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    tok = loaded_fp32.tokenizer
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_tiny_model_is_deterministic(genq_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from worker.model.tiny import TINY, ensure_model

    again = ensure_model(TINY, home=tmp_path)
    first = ensure_model(TINY, home=genq_home)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again.base / name).read_bytes() == (first.base / name).read_bytes()


def test_adapter_only_profile_reads_base_from_adapter_config(tmp_path, tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from worker.core.profiles import load_profile

    src = resolve_sources(tiny_profile)
    p = tmp_path / "adapter-only.yaml"
    p.write_text(f"# test\nadapter: {src.adapter}\n")
    resolved = resolve_sources(load_profile(p))
    assert resolved.base == src.base


def test_missing_repo_offline_names_repo_and_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "remote.yaml"
    p.write_text("# test\nbase: genq-test/does-not-exist\n")
    code = (
        "from worker.core.profiles import load_profile; from worker.model.loading import resolve_sources\n"
        f"resolve_sources(load_profile({str(p)!r}))"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode != 0
    assert "genq-test/does-not-exist" in proc.stderr and "genq-worker prefetch" in proc.stderr


def test_pickle_only_checkpoint_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from worker.core.profiles import load_profile

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    p = tmp_path / "unsafe.yaml"
    p.write_text(f"# test\nbase: {folder}\n")
    with pytest.raises(ModelLoadError, match="refuses pickle"):
        resolve_sources(load_profile(p))
