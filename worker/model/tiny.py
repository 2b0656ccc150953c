"""Builds small random Qwen2-shaped models with a LoRA adapter, offline, in seconds.

Used by the ``tiny-random`` profile (tests and the offline demo) and by the benchmarks (a ~200M
parameter model of the same shape family).  The result is a normal Hugging Face checkpoint on
disk — safetensors weights, a ``tokenizer.json`` with a chat template and Qwen's special tokens, and
a peft adapter folder — so it goes through exactly the same loading code as hub models.

Everything is deterministic for a given :class:`ModelSpec`: the tokenizer is trained on a
synthetic corpus from a seeded generator and the weights come from seeded initialisation.  Builds
go to a temporary folder renamed into place, so concurrent workers can build the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUILDER_VERSION = "1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SYLLABLES = (
    "ka ri to ne su mi ra lo pe du chi an el or is um ex qu ba vo li ge sa ti no ma re ho fa "
    "de ly ur ion ment pat ient dose ther apy card iac ren al hep at ic blood pres sure"
).split()
_WORDS = (
    "the patient has a history of chest pain and shortness of breath . what is the dose of "
    "aspirin for an adult ? symptoms include fever , cough and fatigue . explain the treatment "
    "options for type 2 diabetes in simple words . blood pressure was 140 / 90 mmHg ."
).split()


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a random Qwen2 model and its adapter."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    initializer_range: float = 0.2
    lora_rank: int = 8
    seed: int = 0
    dtype: str = "float32"
    """Weights as saved (``bfloat16`` halves the disk and RAM a 7B-shaped model needs)."""

    def key(self) -> str:
        fields = asdict(self)
        if fields["dtype"] == "float32":  # models built before the field existed keep their key
            del fields["dtype"]
        blob = json.dumps({"v": BUILDER_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


TINY = ModelSpec()
"""The ``tiny-random`` profile's model: about 0.2M parameters."""

BENCH_200M = ModelSpec(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    initializer_range=0.02,
    lora_rank=16,
)
"""The benchmark model: ~210M parameters (176M outside the embedding), Qwen2-shaped."""

QWEN25_7B_SHAPE = ModelSpec(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    initializer_range=0.02,
    lora_rank=16,
    dtype="bfloat16",
)
"""Qwen2.5-7B-Instruct's shapes (7.6B parameters) with random weights, for GPU throughput: the
weights do not matter for speed, only the shapes.  About 15 GB on disk in bf16."""


@dataclass(frozen=True)
class TinyModel:
    base: Path
    adapter: Path


def _corpus(seed: int, n_words: int) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_words // 12):
        words = [
            rng.choice(_WORDS)
            if rng.random() < 0.5
            else "".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4)))
            for _ in range(12)
        ]
        lines.append(" ".join(words))
    return lines


def build_tokenizer(spec: ModelSpec, out: Path) -> None:
    """Train a byte-level BPE tokenizer of ``spec.vocab_size`` and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # a tokenizer of more than 32k tokens buys nothing for random weights and takes minutes to
    # train: the model's embedding still has spec.vocab_size rows (see build_model)
    tok_vocab = min(spec.vocab_size, 32_000)
    trainer = trainers.BpeTrainer(
        vocab_size=tok_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_words = max(20_000, tok_vocab * 40)
    tok.train_from_iterator(_corpus(spec.seed, n_words), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(spec: ModelSpec, base_dir: Path, adapter_dir: Path) -> None:
    """Random Qwen2 weights (safetensors) in ``base_dir``, a non-zero LoRA in ``adapter_dir``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    vocab = max(spec.vocab_size, len(tokenizer))
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=int(tokenizer.convert_tokens_to_ids("<|endoftext|>")),  # type: ignore[arg-type]
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    if spec.dtype == "float32":
        model = Qwen2ForCausalLM(config).float().eval()
    else:  # initialise in the saved dtype: a 7B-shaped model never exists in fp32
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.dtype)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(str(base_dir), safe_serialization=True)

    torch.manual_seed(spec.seed + 1)
    save_adapter(model, spec, adapter_dir, base_dir, scale=0.5)


def save_adapter(model: Any, spec: ModelSpec, out: Path, base_dir: Path, *, scale: float) -> None:
    """A random (non-zero) LoRA on every projection of ``model``, its A and B × ``scale``, saved
    to ``out`` (the caller seeds torch)."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=2 * spec.lora_rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter really changes the output
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(cfg, indent=2))


TINY_ADAPTER_SCALE = 1.0
"""A and B of the named tiny adapters (``adapters: {a: {tiny: 1}}``) are scaled by this: large
enough that two of them (two seeds) give different greedy text on the tiny model."""


def ensure_adapter(seed: int, spec: ModelSpec = TINY, home: Path | None = None) -> Path:
    """A tiny random LoRA for ``spec``'s model built with ``seed`` (once, like the model): the
    named adapters of a tiny profile.  Returns its folder."""
    built = ensure_model(spec, home)
    root = built.base.parent / "adapters"
    final = root / f"seed-{seed}"
    if (final / "COMPLETE").exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".seed-{seed}-", dir=root))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(built.base), dtype=torch.float32)
        torch.manual_seed(1_000_003 * (seed + 1))
        save_adapter(model, spec, tmp, built.base, scale=TINY_ADAPTER_SCALE)
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "COMPLETE").exists():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_model(spec: ModelSpec = TINY, home: Path | None = None) -> TinyModel:
    """Build the model for ``spec`` under ``home`` unless it is already there; return its paths."""
    if home is None:
        from worker.core.settings import get_settings

        home = get_settings().home
    root = Path(home) / "tiny" / spec.key()
    final = TinyModel(base=root / "base", adapter=root / "adapter")
    if (root / "COMPLETE").exists():
        return final
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=root.parent))
    try:
        base, adapter = tmp / "base", tmp / "adapter"
        base.mkdir()
        build_tokenizer(spec, base)
        build_model(spec, base, adapter)
        # the adapter must name its base at the final location, not the temporary one
        cfg_path = adapter / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(final.base)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "COMPLETE").exists():  # lost a race to a broken build: replace it
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":  # python -m worker.model.tiny: build the tiny model and print where it is
    built = ensure_model()
    print(json.dumps({"base": str(built.base), "adapter": str(built.adapter)}))
