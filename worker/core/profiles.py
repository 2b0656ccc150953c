"""Model profiles: which base model and adapter, pinned revisions, limits and defaults.

Profiles are commented YAML files in ``configs/``, found by name (``--profile qwen2.5-7b-medical``
→ ``configs/qwen2.5-7b-medical.yaml``) or by path.  A job names a profile; a worker only serves the
profile it was started with, so a job can never make a worker download or load anything else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.core.errors import ConfigError, ProfileNotFound
from worker.core.schema import GenParams
from worker.core.settings import Settings, get_settings
from worker.core.structured import MAX_N

PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Section):
    max_new_tokens: Annotated[int, Field(gt=0)] = 4096
    """Hard cap on ``max_new_tokens``; submit refuses items asking for more."""

    max_n: Annotated[int, Field(gt=0, le=MAX_N)] = 16
    """Most samples per item (``n``); submit refuses items asking for more."""

    context_length: Annotated[int, Field(gt=0)] | None = None
    """Prompt + completion tokens an item may use.  Default: the model's
    ``max_position_embeddings``.  Longer prompts error with ``context_length_exceeded``."""


class EngineConfig(_Section):
    max_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    """Items per micro-batch.  ``auto``: measured once per worker for this hardware."""

    max_batch_tokens: Annotated[int, Field(gt=0)] = 65536
    """Cap on (padded prompt + new tokens) × batch size per micro-batch: bounds KV-cache memory."""


class NF4Config(_Section):
    compute_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    """``auto``: bf16 when the GPU supports it, else fp16."""

    kv_cache_headroom: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Fraction of each GPU's memory kept free for the KV cache and activations when
    ``device_map="auto"`` places layers (passed as ``max_memory``)."""

    cpu_offload_gib: Annotated[float, Field(gt=0)] | None = None
    """RAM ``device_map="auto"`` may use for layers that do not fit on the GPU (fp32, offloaded).
    Default: 80% of available RAM."""

    offload_folder: Path | None = None
    """Overrides the worker's ``GENQ_OFFLOAD_FOLDER`` for this profile."""


class Profile(_Section):
    name: str
    description: str = ""

    base: str | None = None
    """Base model: a hub repository id or a local folder.  May be left out when ``adapter`` is
    set: it is then read from the adapter's ``adapter_config.json``."""

    base_revision: str | None = None
    """Branch, tag or (best) commit sha of ``base``."""

    adapter: str | None = None
    """LoRA adapter: a hub repository id or a local folder.  None: the base model alone."""

    adapter_revision: str | None = None

    tiny: bool = False
    """Build the tiny random model with ``worker/model/tiny.py`` (offline, seconds) and use it for
    ``base`` and ``adapter``.  For tests and the offline demo."""

    trust_remote_code: bool = False
    """Run Python code shipped in the model repository.  Off unless you trust the repository."""

    use_safetensors: bool = True
    """Load weights only from safetensors files (never pickle-based ``.bin``)."""

    generation: GenParams = GenParams(max_new_tokens=256, temperature=0.0)
    """Defaults for items and jobs that do not set a parameter."""

    limits: Limits = Limits()
    engine: EngineConfig = EngineConfig()
    nf4: NF4Config = NF4Config()

    source: Path | None = None
    """The file this profile was read from (filled in by the loader)."""

    @model_validator(mode="after")
    def _check(self) -> Profile:
        if not PROFILE_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if not self.tiny and not (self.base or self.adapter):
            raise ValueError("a profile needs 'base', 'adapter' or 'tiny: true'")
        mnt = self.generation.max_new_tokens
        if mnt is not None and mnt > self.limits.max_new_tokens:
            raise ValueError("generation.max_new_tokens is above limits.max_new_tokens")
        return self

    @property
    def default_params(self) -> GenParams:
        return self.generation.over(GenParams(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0))


def available_profiles(settings: Settings | None = None) -> list[str]:
    folder = (settings or get_settings()).configs_dir
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def profile_path(name_or_path: str | Path, settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or candidate.is_file():
        if not candidate.is_file():
            raise ProfileNotFound(f"profile file {text} does not exist")
        return candidate
    if not PROFILE_NAME.match(text):
        raise ProfileNotFound(f"{text!r} is not a profile name")
    path = settings.configs_dir / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(settings)) or "none"
        raise ProfileNotFound(f"unknown profile {text!r} (known in {settings.configs_dir}: {known})")
    return path


def load_profile(name_or_path: str | Path, settings: Settings | None = None) -> Profile:
    """Read and validate a profile.  Errors name the file and the field."""
    path = profile_path(name_or_path, settings)
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a YAML mapping")
    raw.setdefault("name", path.stem)
    raw["source"] = path
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: field '{loc}': {err['msg']}") from None
