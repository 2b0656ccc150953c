"""Load a profile's base model + LoRA adapter once, in the mode the hardware supports.

``load_model(profile, mode)`` is the only function in genq that calls ``from_pretrained``:

* ``nf4``: bitsandbytes 4-bit NF4 with double quantisation, ``device_map="auto"`` on a GPU with a
  ``max_memory`` that leaves KV-cache headroom, fp32 CPU offload and an offload folder; the adapter
  is attached unmerged with ``PeftModel.from_pretrained``.  On a CPU, bitsandbytes' CPU backend.
* ``fp32``: ``dtype=torch.float32`` on the CPU, a lone adapter loaded and merged
  (``merge_and_unload``), so generation costs what the base model costs; a profile's several
  adapters all stay unmerged (:mod:`worker.model.adapters`).

Hub access goes through :func:`resolve_sources`, which only ever fetches the files a profile needs
(safetensors weights, configs, tokenizer) and turns hub errors into messages that name the
repository and the fix.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.core.errors import ModelLoadError
from worker.core.logs import get_logger
from worker.core.profiles import SINGLE_ADAPTER, Profile
from worker.core.settings import Settings, get_settings
from worker.core.states import LoadMode, Mode
from worker.model.adapters import AdapterFolder, AdapterState, adapter_folders, attach
from worker.model.capability import (
    Decision,
    Estimate,
    Facts,
    choose_mode,
    estimate,
    gpu_budget,
    probe,
    ram_budget,
)

WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
META_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]
UNSAFE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl"]
NEVER_PATTERNS = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf", "original/*", "*.tflite", "*.ot"]


@dataclass(frozen=True)
class Sources:
    """Local folders of a profile's checkpoint, after any download."""

    base: Path
    adapter: Path | None
    base_id: str
    adapter_id: str | None
    adapters: list[AdapterFolder] = field(default_factory=list)
    """Every adapter of the profile, the default (``adapter`` above) first."""


@dataclass
class Loaded:
    """A model ready to generate, and what it took to get there."""

    model: Any
    tokenizer: Any
    profile: Profile
    mode: Mode
    device: str
    placement: dict[str, int]
    quantized_linear_layers: int
    adapter: AdapterState
    weights_bytes: int
    estimate: Estimate
    decision: Decision
    load_seconds: float
    context_length: int
    eos_token_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    """Every loaded adapter: its name → how results name it (``base:<this>``); the default first."""

    @property
    def default_adapter(self) -> str | None:
        return next(iter(self.adapters), None)

    @property
    def offloaded(self) -> bool:
        return self.placement.get("cpu", 0) + self.placement.get("disk", 0) > 0 and self.device == "cuda"

    def summary(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "mode": self.mode,
            "device": self.device,
            "placement": self.placement,
            "quantized_linear_layers": self.quantized_linear_layers,
            "adapter": self.adapter,
            "weights_bytes": self.weights_bytes,
            "estimated_bytes": self.estimate.bytes_for(self.mode, self.device),
            "load_seconds": round(self.load_seconds, 3),
            "context_length": self.context_length,
            **self.extra,
        }


# --- hub -----------------------------------------------------------------------------------


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def hub_patterns(profile: Profile, *, weights: bool = True) -> tuple[list[str], list[str]]:
    allow = list(META_PATTERNS)
    if weights:
        allow += WEIGHT_PATTERNS + ([] if profile.use_safetensors else ["*.bin", "*.bin.index.json"])
    ignore = NEVER_PATTERNS + (UNSAFE_PATTERNS if profile.use_safetensors else [])
    return allow, ignore


def hub_error(exc: Exception, repo: str, revision: str | None, profile: Profile) -> ModelLoadError:
    """Turn a huggingface_hub exception into a message that names the repository and the fix."""
    from huggingface_hub import errors as hf

    rev = f" at revision {revision!r}" if revision else ""
    fix_offline = (
        f"run `genq-worker prefetch --profile {profile.name}` on a machine with network access "
        "(and share HF_HOME), or unset HF_HUB_OFFLINE"
    )
    if isinstance(exc, hf.GatedRepoError):
        return ModelLoadError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo} with your account, "
            "then set HF_TOKEN (or run `hf auth login`) on this machine"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelLoadError(f"{repo} has no revision {revision!r}: fix the revision in {profile.source}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelLoadError(
            f"{repo}{rev} was not found or needs authentication (401/404): check the name in "
            f"{profile.source}, and set HF_TOKEN if it is private"
        )
    if isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
        return ModelLoadError(
            f"{repo}{rev} is not in the local Hugging Face cache and cannot be downloaded: {fix_offline}"
        )
    if isinstance(exc, hf.HfHubHTTPError):
        return ModelLoadError(f"downloading {repo}{rev} failed: {exc}")
    if isinstance(exc, OSError | ConnectionError):
        return ModelLoadError(f"downloading {repo}{rev} failed ({type(exc).__name__}: {exc}); {fix_offline}")
    return ModelLoadError(f"{repo}{rev}: {type(exc).__name__}: {exc}")


def fetch_repo(repo: str, revision: str | None, profile: Profile, settings: Settings, **kwargs: Any) -> Any:
    """``snapshot_download`` of only the files a profile needs; errors name the repo and the fix."""
    from huggingface_hub import snapshot_download

    allow, ignore = hub_patterns(profile, weights=kwargs.pop("weights", True))
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        return snapshot_download(
            repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore, token=token, **kwargs
        )
    except Exception as exc:
        raise hub_error(exc, repo, revision, profile) from None


def resolve_sources(profile: Profile, settings: Settings | None = None) -> Sources:
    """Local folders for the profile's base and adapter, downloading what is missing."""
    settings = settings or get_settings()

    def fetch(repo: str, revision: str | None) -> Any:
        return fetch_repo(repo, revision, profile, settings)

    if profile.tiny:
        from worker.model.tiny import ensure_model

        built = ensure_model(home=settings.home)
        if profile.adapters is None:
            own = AdapterFolder(SINGLE_ADAPTER, built.adapter, "tiny-random-lora")
            return Sources(built.base, built.adapter, "tiny-random", own.id, [own])
        named = adapter_folders(profile, settings, fetch)
        return Sources(built.base, named[0].folder, "tiny-random", named[0].id, named)

    named = adapter_folders(profile, settings, fetch)
    adapter_dir = named[0].folder if named else None
    base = profile.base
    base_revision = profile.base_revision
    if base is None:
        assert adapter_dir is not None
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{named[0].id}'s adapter_config.json names no base model; set 'base'")
        base_revision = cfg.get("revision") or base_revision
    base_dir = (
        Path(base).expanduser()
        if _is_local(base)
        else Path(fetch_repo(base, base_revision, profile, settings))
    )
    if profile.use_safetensors and not list(base_dir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{base} has no safetensors weights; genq refuses pickle-based .bin checkpoints unless "
            f"{profile.source} sets use_safetensors: false"
        )
    return Sources(base_dir, adapter_dir, base, named[0].id if named else None, named)


# --- loading -------------------------------------------------------------------------------


def _compute_dtype(profile: Profile, facts: Facts, device: str) -> Any:
    import torch

    choice = profile.nf4.compute_dtype
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "float16":
        return torch.float16
    if device == "cpu":
        return torch.float32  # bitsandbytes' CPU kernels: fp32 compute is exact and not slower
    return torch.bfloat16 if facts.gpus and facts.gpus[0].bf16 else torch.float16


def _placement(model: Any, n_layers: int, device: str) -> dict[str, int]:
    """How many decoder layers landed on the GPU, the CPU and disk."""
    device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)
    if not device_map or set(map(str, device_map.values())) <= {"cpu"}:
        where = "gpu" if device == "cuda" else "cpu"
        return {"gpu": n_layers if where == "gpu" else 0, "cpu": n_layers if where == "cpu" else 0, "disk": 0}
    counts: Counter[str] = Counter()
    for name in (f"model.layers.{i}" for i in range(n_layers)):
        target: Any = None
        for key, value in device_map.items():
            if name == key or name.startswith(key + ".") or key in ("", "model"):
                target = value
                break
        if target is None:  # the layer was split further: take where its first part went
            target = next((v for k, v in device_map.items() if k.startswith(name + ".")), "cpu")
        counts["disk" if target == "disk" else "cpu" if target == "cpu" else "gpu"] += 1
    return {"gpu": counts["gpu"], "cpu": counts["cpu"], "disk": counts["disk"]}


def _weights_bytes(model: Any) -> int:
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():  # 4-bit quantisation constants live outside the parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            absmax = getattr(state, "absmax", None)
            total += absmax.numel() * absmax.element_size() if absmax is not None else 0
            nested = getattr(state, "state2", None)
            if nested is not None and getattr(nested, "absmax", None) is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    return total


def _count_4bit(model: Any) -> int:
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, Linear4bit))


def load_tokenizer(sources: Sources, profile: Profile) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(sources.base), trust_remote_code=profile.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"loading the tokenizer of {sources.base_id} (profile {profile.source or profile.name}) "
            f"failed: {exc}"
        ) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    profile: Profile,
    mode: LoadMode | str = LoadMode.AUTO,
    *,
    settings: Settings | None = None,
    facts: Facts | None = None,
) -> Loaded:
    """Resolve, check memory, load base + adapter in the chosen mode.  Raises genq errors only.

    Longer than most functions here on purpose: it is the load's one sequence (resolve, estimate,
    decide, config, weights, adapters, tokenizer, summary), read top to bottom; each step that
    can fail is its own helper and says what to fix."""
    from worker.model.quiet import quiet_model_libraries

    quiet_model_libraries()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading checkpoint shards" bars mean nothing in worker logs

    settings = settings or get_settings()
    log = get_logger(profile=profile.name)
    started = time.perf_counter()
    sources = resolve_sources(profile, settings)
    est = estimate(sources.base, sources.adapter)
    facts = facts or probe()
    decision = choose_mode(facts, est, mode, headroom=profile.nf4.kv_cache_headroom)
    log.info("mode_chosen", mode=decision.mode, device=decision.device, reason=decision.reason)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    common: dict[str, Any] = {
        "trust_remote_code": profile.trust_remote_code,
        "use_safetensors": True if profile.use_safetensors else None,
        "low_cpu_mem_usage": True,
    }
    try:
        config = AutoConfig.from_pretrained(str(sources.base), trust_remote_code=profile.trust_remote_code)
    except (OSError, ValueError) as exc:  # e.g. custom code refused: trust_remote_code is off
        raise ModelLoadError(
            f"reading the config of {sources.base_id} (profile {profile.source or profile.name}) "
            f"failed: {exc}"
        ) from exc
    model: Any
    try:
        kwargs = _load_kwargs(profile, settings, facts, decision)
        model = AutoModelForCausalLM.from_pretrained(str(sources.base), **kwargs, **common)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"loading {sources.base_id} in {decision.mode} failed: {exc}") from exc

    model, adapter_state = attach(model, sources.adapters, decision.mode)
    model.eval()
    model.requires_grad_(False)

    tokenizer = load_tokenizer(sources, profile)
    n_layers = int(getattr(config, "num_hidden_layers", 0))
    placement = _placement(model, n_layers, decision.device)
    context = profile.limits.context_length or int(getattr(config, "max_position_embeddings", 4096))
    eos = _eos_ids(model, tokenizer)
    loaded = Loaded(
        model=model,
        tokenizer=tokenizer,
        profile=profile,
        mode=decision.mode,
        device=decision.device,
        placement=placement,
        quantized_linear_layers=_count_4bit(model),
        adapter=adapter_state,
        weights_bytes=_weights_bytes(model),
        estimate=est,
        decision=decision,
        load_seconds=time.perf_counter() - started,
        context_length=context,
        eos_token_ids=eos,
    )
    loaded.adapters = {a.name: a.id for a in sources.adapters}
    loaded.extra.update(base_model=sources.base_id, adapter_model=sources.adapter_id)
    if profile.multi_adapter:
        loaded.extra["adapters"] = dict(loaded.adapters)
    if decision.device == "cuda":
        loaded.extra["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated())
    log.info("model_loaded", **loaded.summary())
    if loaded.offloaded:
        log.warning(
            "layers_offloaded",
            placement=placement,
            message="layers were placed on the CPU or disk: generation will be several times slower. "
            "Use a bigger GPU, lower nf4.kv_cache_headroom, or a smaller profile.",
        )
    return loaded


def _load_kwargs(profile: Profile, settings: Settings, facts: Facts, decision: Decision) -> dict[str, Any]:
    """``from_pretrained`` arguments for the chosen mode: fp32 on the CPU; NF4 with double
    quantisation and fp32 CPU offload, and on a GPU ``device_map="auto"`` with a ``max_memory``
    that leaves KV-cache headroom and an offload folder."""
    import torch

    if decision.mode == "fp32":
        return {"dtype": torch.float32, "device_map": "cpu"}
    from transformers import BitsAndBytesConfig

    compute = _compute_dtype(profile, facts, decision.device)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_enable_fp32_cpu_offload=True,
    )
    kwargs: dict[str, Any] = {"quantization_config": quant, "dtype": compute, "device_map": "cpu"}
    if decision.device == "cuda":
        offload = profile.nf4.offload_folder or settings.offload_dir
        offload.mkdir(parents=True, exist_ok=True)
        cpu_bytes = (
            int(profile.nf4.cpu_offload_gib * 1024**3) if profile.nf4.cpu_offload_gib else ram_budget(facts)
        )
        per_gpu = gpu_budget(facts, profile.nf4.kv_cache_headroom) // max(len(facts.gpus), 1)
        max_memory: dict[int | str, int] = {g.index: per_gpu for g in facts.gpus}
        max_memory["cpu"] = cpu_bytes
        kwargs.update(device_map="auto", max_memory=max_memory, offload_folder=str(offload))
    return kwargs


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if (
            isinstance(tid, int)
            and tid != tokenizer.unk_token_id
            and tid >= 0
            and token in tokenizer.get_vocab()
        ):
            ids.add(tid)
    return sorted(ids)
