"""What this machine can do, and which mode a model should load in.

* :func:`probe` gathers :class:`Facts` (GPUs, free VRAM, bf16, a working bitsandbytes CUDA
  backend, RAM, CPUs).  Anything that touches CUDA runs in a short-lived child process, so the
  calling process never initialises CUDA and can still fork (Celery's prefork pool).
* :func:`estimate` computes weight memory per mode from a checkpoint's safetensors headers (or its
  config), without loading weights.
* :func:`choose_mode` applies the rules to facts and an estimate: pure, so tests drive it with
  injected facts.  An explicit mode is honoured or refused, never silently changed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from worker.core.errors import InsufficientMemory, ModeError
from worker.core.states import LoadMode, Mode

GiB = 1024**3
RAM_USABLE = 0.85
"""Fraction of available RAM a model's weights may take (the rest: activations, KV cache, Python)."""
NF4_BLOCK = 64
"""bitsandbytes' 4-bit block size: one absmax constant per 64 weights."""
DOUBLE_QUANT_BLOCK = 256
"""With double quantisation the absmax constants are 8-bit, with one fp32 constant per 256."""


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool
    capability: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Facts:
    gpus: tuple[GpuFacts, ...] = ()
    bnb_cuda: bool = False
    """bitsandbytes is installed and its CUDA backend quantised a tensor."""
    bnb_cpu: bool = False
    """bitsandbytes is installed and its CPU backend quantised a tensor."""
    ram_available_bytes: int = 0
    ram_total_bytes: int = 0
    cpu_count: int = 1
    notes: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["device"] = self.device
        return out


# --- probing -------------------------------------------------------------------------------

_PROBE = r"""
import json, sys
out = {"gpus": [], "bnb_cuda": False, "notes": []}
try:
    import torch
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name, "total_bytes": total, "free_bytes": free,
                                "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else p.major >= 8,
                                "capability": [p.major, p.minor]})
        try:
            import bitsandbytes.functional as F
            q, state = F.quantize_4bit(torch.randn(128, 128, device="cuda", dtype=torch.float16),
                                       quant_type="nf4", compress_statistics=True)
            torch.cuda.synchronize()
            out["bnb_cuda"] = True
        except Exception as exc:  # any failure means: no usable CUDA backend
            out["notes"].append(f"bitsandbytes CUDA backend unavailable: {type(exc).__name__}: {exc}"[:300])
except Exception as exc:
    out["notes"].append(f"CUDA probe failed: {type(exc).__name__}: {exc}"[:300])
print(json.dumps(out))
"""


def _cuda_build() -> bool:
    """Whether the installed torch was built with CUDA (importing torch does not touch a GPU)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def bnb_cpu_works() -> bool:
    """Whether bitsandbytes' CPU backend can quantise (used for nf4 on a CPU)."""
    try:
        import bitsandbytes.functional as F
        import torch

        F.quantize_4bit(torch.randn(128, 128), quant_type="nf4", compress_statistics=True)
        return True
    except Exception:
        return False


def probe(timeout: float = 120.0) -> Facts:
    """Gather facts about this machine without initialising CUDA in this process."""
    import psutil

    from worker.model.quiet import quiet_model_libraries

    quiet_model_libraries()  # before bitsandbytes' first import (bnb_cpu_works)

    vm = psutil.virtual_memory()
    gpus: list[GpuFacts] = []
    notes: list[str] = []
    bnb_cuda = False
    if _cuda_build() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=False
            )
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            gpus = [GpuFacts(**{**g, "capability": tuple(g["capability"])}) for g in data["gpus"]]
            bnb_cuda = bool(data["bnb_cuda"])
            notes.extend(data["notes"])
        except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as exc:
            notes.append(f"CUDA probe failed: {exc}")
    return Facts(
        gpus=tuple(gpus),
        bnb_cuda=bnb_cuda,
        bnb_cpu=bnb_cpu_works(),
        ram_available_bytes=int(vm.available),
        ram_total_bytes=int(vm.total),
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        notes=tuple(notes),
    )


# --- memory estimate -----------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Weight memory of a checkpoint (base + adapter) per mode, in bytes."""

    total_params: int
    quantizable_params: int
    """Parameters of the decoder layers' linear weights: what nf4 stores in 4 bits."""
    other_params: int
    """Embeddings, lm_head, norms, biases: kept in the compute dtype under nf4."""
    adapter_params: int = 0
    source: str = "config"

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.total_params  # the adapter is merged: no extra weights

    def nf4_bytes_with(self, other_bytes: int) -> int:
        """nf4 weights when the non-quantised parts take ``other_bytes`` per parameter."""
        q = self.quantizable_params
        packed = q // 2
        absmax = q // NF4_BLOCK  # 8-bit constants under double quantisation
        second = (q // NF4_BLOCK // DOUBLE_QUANT_BLOCK) * 4 + 4096
        return packed + absmax + second + other_bytes * self.other_params + 4 * self.adapter_params

    @property
    def nf4_bytes(self) -> int:
        """On a GPU: embeddings, lm_head and norms in the 16-bit compute dtype."""
        return self.nf4_bytes_with(2)

    @property
    def nf4_cpu_bytes(self) -> int:
        """On a CPU the compute dtype is fp32, so the non-quantised parts take 4 bytes."""
        return self.nf4_bytes_with(4)

    def bytes_for(self, mode: Mode, device: str = "cuda") -> int:
        if mode == "fp32":
            return self.fp32_bytes
        return self.nf4_cpu_bytes if device == "cpu" else self.nf4_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "quantizable_params": self.quantizable_params,
            "adapter_params": self.adapter_params,
            "fp32_bytes": self.fp32_bytes,
            "nf4_bytes": self.nf4_bytes,
            "nf4_cpu_bytes": self.nf4_cpu_bytes,
            "source": self.source,
        }


def _is_quantizable(name: str, shape: list[int]) -> bool:
    """Linear weights inside the decoder layers; bitsandbytes keeps lm_head and embeddings."""
    return (
        len(shape) == 2
        and name.endswith(".weight")
        and ".layers." in name
        and "norm" not in name
        and "embed" not in name
    )


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes (no weights read)."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path}: implausible safetensors header of {length} bytes")
        header: dict[str, Any] = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _count(shapes: Iterable[tuple[str, list[int]]]) -> tuple[int, int]:
    quant = other = 0
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        if _is_quantizable(name, shape):
            quant += n
        else:
            other += n
    return quant, other


def _shapes_from_config(cfg: dict[str, Any]) -> list[tuple[str, list[int]]]:
    h = int(cfg["hidden_size"])
    i = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg["vocab_size"])
    shapes: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [vocab, h])]
    if not cfg.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", [vocab, h]))
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes += [
            (p + "self_attn.q_proj.weight", [heads * hd, h]),
            (p + "self_attn.k_proj.weight", [kv * hd, h]),
            (p + "self_attn.v_proj.weight", [kv * hd, h]),
            (p + "self_attn.o_proj.weight", [h, heads * hd]),
            (p + "mlp.gate_proj.weight", [i, h]),
            (p + "mlp.up_proj.weight", [i, h]),
            (p + "mlp.down_proj.weight", [h, i]),
            (p + "input_layernorm.weight", [h]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
        if cfg.get("model_type") == "qwen2" or cfg.get("attention_bias"):
            shapes += [
                (p + "self_attn.q_proj.bias", [heads * hd]),
                (p + "self_attn.k_proj.bias", [kv * hd]),
                (p + "self_attn.v_proj.bias", [kv * hd]),
            ]
    shapes.append(("model.norm.weight", [h]))
    return shapes


def estimate(base_dir: Path, adapter_dir: Path | None = None) -> Estimate:
    """Estimate weight memory from a local checkpoint folder without loading any weight."""
    files = sorted(base_dir.glob("*.safetensors"))
    if files:
        shapes = [(n, t["shape"]) for f in files for n, t in read_safetensors_header(f).items()]
        source = "safetensors"
        cfg_file = base_dir / "config.json"
        if cfg_file.exists() and json.loads(cfg_file.read_text()).get("tie_word_embeddings"):
            shapes = [(n, s) for n, s in shapes if n != "lm_head.weight"]
    else:
        shapes = _shapes_from_config(json.loads((base_dir / "config.json").read_text()))
        source = "config"
    quant, other = _count(shapes)
    adapter = 0
    if adapter_dir is not None:
        for f in sorted(adapter_dir.glob("*.safetensors")):
            adapter += sum(
                _numel(t["shape"]) for t in read_safetensors_header(f).values() if isinstance(t, dict)
            )
    return Estimate(
        total_params=quant + other,
        quantizable_params=quant,
        other_params=other,
        adapter_params=adapter,
        source=source,
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- choosing a mode -----------------------------------------------------------------------

Placement = Literal["gpu", "gpu+cpu", "cpu"]


@dataclass(frozen=True)
class Decision:
    mode: Mode
    device: Literal["cuda", "cpu"]
    placement: Placement
    reason: str
    budgets: dict[str, int] = field(default_factory=dict)

    @property
    def offloaded(self) -> bool:
        return self.placement == "gpu+cpu"


def gpu_budget(facts: Facts, headroom: float) -> int:
    """GPU bytes the weights may take, leaving ``headroom`` of each GPU for the KV cache."""
    return sum(int(min(g.free_bytes, g.total_bytes * (1 - headroom))) for g in facts.gpus)


def ram_budget(facts: Facts) -> int:
    return int(facts.ram_available_bytes * RAM_USABLE)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def choose_mode(
    facts: Facts, est: Estimate, requested: LoadMode | str = LoadMode.AUTO, *, headroom: float = 0.2
) -> Decision:
    """The rules.  ``auto``: nf4 on a CUDA GPU with bitsandbytes (spilling to CPU if it must);
    on a CPU, fp32 when it fits in RAM, else nf4 through bitsandbytes' CPU backend, else an error
    naming the numbers.  An explicit mode is honoured or refused with the reason."""
    if requested not in tuple(LoadMode):
        raise ModeError(f"unknown mode {requested!r}: choose auto, nf4 or fp32")
    ram = ram_budget(facts)
    gpu = gpu_budget(facts, headroom)
    nf4, fp32 = est.nf4_bytes, est.fp32_bytes
    budgets = {"gpu_bytes": gpu, "ram_bytes": ram, "nf4_bytes": nf4, "fp32_bytes": fp32}
    numbers = (
        f"weights need {_gib(fp32)} in fp32 and {_gib(nf4)} in nf4; this machine offers "
        f"{_gib(ram)} of RAM ({_gib(facts.ram_available_bytes)} available × {RAM_USABLE:.0%})"
        + (f" and {_gib(gpu)} of GPU memory after {headroom:.0%} KV-cache headroom" if facts.gpus else "")
    )

    def nf4_decision() -> Decision | None:
        if facts.gpus and facts.bnb_cuda:
            if nf4 <= gpu:
                return Decision(Mode.NF4, "cuda", "gpu", f"nf4 fits on the GPU; {numbers}", budgets)
            # layers that do not fit the GPU are offloaded to the CPU in fp32 (8x their nf4 size)
            spill = (nf4 - gpu) * 8
            if spill <= ram:
                return Decision(
                    Mode.NF4,
                    "cuda",
                    "gpu+cpu",
                    f"nf4 does not fit the GPU: about {_gib(spill)} of layers go to the CPU "
                    f"(slow); {numbers}",
                    budgets,
                )
            return None
        if facts.bnb_cpu and est.nf4_cpu_bytes <= ram:
            return Decision(
                Mode.NF4, "cpu", "cpu", f"nf4 on the CPU through bitsandbytes; {numbers}", budgets
            )
        return None

    if requested == "fp32":
        if fp32 <= ram:
            return Decision(Mode.FP32, "cpu", "cpu", f"fp32 requested; {numbers}", budgets)
        raise InsufficientMemory(
            f"--mode fp32 refused: {numbers}. Use --mode nf4 (needs bitsandbytes) or a machine with "
            f"at least {_gib(int(fp32 / RAM_USABLE))} of free RAM."
        )
    if requested == "nf4":
        if not (facts.bnb_cuda or facts.bnb_cpu):
            raise ModeError(
                "--mode nf4 refused: bitsandbytes has no working backend here "
                "(pip install bitsandbytes; on a GPU it needs a CUDA build of torch)."
                + (" " + "; ".join(facts.notes) if facts.notes else "")
            )
        found = nf4_decision()
        if found is None:
            raise InsufficientMemory(f"--mode nf4 refused: {numbers}.")
        return found

    found = nf4_decision() if facts.gpus and facts.bnb_cuda else None
    if found is not None:
        return found
    if fp32 <= ram:
        why = "no CUDA GPU with bitsandbytes" if not (facts.gpus and facts.bnb_cuda) else "nf4 does not fit"
        return Decision(Mode.FP32, "cpu", "cpu", f"fp32 on the CPU ({why}); {numbers}", budgets)
    if facts.bnb_cpu and est.nf4_cpu_bytes <= ram:
        return Decision(
            Mode.NF4, "cpu", "cpu", f"fp32 does not fit in RAM, nf4 on the CPU does; {numbers}", budgets
        )
    raise InsufficientMemory(
        f"the model fits in no mode here: {numbers}. Free memory, use a machine with more RAM or a "
        "GPU, or choose a smaller profile (e.g. qwen2.5-0.5b-instruct)."
    )
