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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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

    adapter_batching: Literal["grouped", "mixed"] = "grouped"
    """Profiles with several adapters: ``grouped`` cuts micro-batches of one adapter each (peft's
    plain unmerged forward per pass), ``mixed`` decodes rows of any adapters together, each through
    its own (peft's per-row ``adapter_names``).  See docs/OPERATIONS.md, "Several adapters on one
    base", for what each costs."""


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


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SINGLE_ADAPTER = "default"
"""The name of the one adapter of a profile that sets ``adapter`` (not ``adapters``)."""


class AdapterSource(_Section):
    """One LoRA adapter of a profile's ``adapters``: a hub repository, a local folder, or (tiny
    profiles only) a tiny random LoRA built with a seed."""

    repo: str | None = None
    """A hub repository id."""

    path: str | None = None
    """A local folder (``adapter_config.json`` and safetensors weights)."""

    revision: str | None = None
    """Branch, tag or (best) commit sha of ``repo``."""

    tiny: Annotated[int, Field(ge=0)] | None = None
    """A tiny random LoRA built by ``worker/model/tiny.py`` with this seed (``tiny: true``
    profiles only; for tests and the offline demo)."""

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSource:
        given = [k for k in ("repo", "path", "tiny") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"an adapter needs exactly one of 'repo', 'path' and 'tiny', got {got}")
        if self.revision is not None and self.repo is None:
            raise ValueError("'revision' goes with 'repo'")
        return self

    @property
    def ref(self) -> str | None:
        """The repository or folder (None for a tiny adapter)."""
        return self.repo if self.repo is not None else self.path


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

    adapters: dict[str, AdapterSource] | None = None
    """Several LoRA adapters on the one base, by name (``{a: {repo: ..., revision: ...}, b:
    {path: ...}}``).  A job (``--adapter``) or an item (``adapter``) picks one of them; a worker
    loads the base once and all of them.  Not together with ``adapter``."""

    default_adapter: str | None = None
    """The adapter of items and jobs that name none (default: the first of ``adapters``)."""

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
        if self.adapters is not None:
            if self.adapter is not None:
                raise ValueError("set either 'adapter' (one adapter) or 'adapters' (several), not both")
            for name, source in self.adapters.items():
                if source.tiny is not None and not self.tiny:
                    raise ValueError(f"adapter {name!r}: 'tiny' adapters need 'tiny: true'")
        elif self.default_adapter is not None:
            raise ValueError("'default_adapter' needs 'adapters'")
        mnt = self.generation.max_new_tokens
        if mnt is not None and mnt > self.limits.max_new_tokens:
            raise ValueError("generation.max_new_tokens is above limits.max_new_tokens")
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, AdapterSource] | None) -> dict[str, AdapterSource] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("lists no adapter")
        for name in value:
            if not ADAPTER_NAME.match(name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-'")
        return value

    @field_validator("default_adapter")
    @classmethod
    def _default_listed(cls, value: str | None, info: ValidationInfo) -> str | None:
        adapters = info.data.get("adapters")
        if value is not None and adapters and value not in adapters:
            raise ValueError(f"{value!r} is not one of the adapters ({', '.join(adapters)})")
        return value

    @property
    def named_adapters(self) -> dict[str, AdapterSource]:
        """Every adapter by name: ``adapters``, or the one ``adapter`` as ``default`` (a tiny
        profile's built-in LoRA is ``default`` too); empty for a base model alone."""
        if self.adapters is not None:
            return dict(self.adapters)
        if self.adapter is not None:
            if Path(self.adapter).expanduser().is_dir():
                return {SINGLE_ADAPTER: AdapterSource(path=self.adapter)}
            return {SINGLE_ADAPTER: AdapterSource(repo=self.adapter, revision=self.adapter_revision)}
        if self.tiny:  # the tiny model's own LoRA (the loader builds it with the base)
            return {SINGLE_ADAPTER: AdapterSource(tiny=0)}
        return {}

    @property
    def multi_adapter(self) -> bool:
        """The profile lists named ``adapters``: results record which one answered."""
        return self.adapters is not None

    @property
    def default_adapter_name(self) -> str | None:
        names = list(self.named_adapters)
        if not names:
            return None
        return self.default_adapter or names[0]

    def check_adapter(self, name: str) -> str:
        """``name`` if the profile lists it; else a ValueError that lists the ones it has."""
        names = self.named_adapters
        if name in names:
            return name
        known = ", ".join(names) or "none"
        raise ValueError(f"unknown adapter {name!r}: profile {self.name} lists {known}")

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
