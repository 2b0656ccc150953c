"""A profile's files without its weights: what `genq estimate` reads on a submitting machine.

Nothing here imports torch when it runs (a submitting machine may not have it): the tiny model
is found where a worker built it (building it, the first time, does need torch), a local folder
is read in place, and a hub repository contributes only its small files (config, tokenizer,
chat template; about a megabyte) through the same download rules as a worker.  Weight memory
then comes from the safetensors headers when the weights are on this machine, else from the
config (:func:`worker.model.capability.estimate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker.core.errors import ModelLoadError
from worker.core.profiles import Profile
from worker.core.settings import Settings, get_settings
from worker.model.adapters import adapter_folders
from worker.model.capability import Estimate, estimate
from worker.model.loading import _is_local, fetch_repo


@dataclass(frozen=True)
class ModelFiles:
    base: Path
    adapter: Path | None
    base_id: str
    adapter_id: str | None

    @property
    def name(self) -> str:
        """``base:adapter`` as results name the model."""
        return f"{self.base_id}:{self.adapter_id}" if self.adapter_id else self.base_id

    def weights(self) -> Estimate:
        return estimate(self.base, self.adapter)

    def config(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.base / "config.json").read_text())
        return data


def _folder(ref: str, revision: str | None, profile: Profile, settings: Settings) -> Path:
    if _is_local(ref):
        return Path(ref).expanduser()
    return Path(fetch_repo(ref, revision, profile, settings, weights=False))


def model_files(profile: Profile, settings: Settings | None = None) -> ModelFiles:
    settings = settings or get_settings()
    if profile.tiny:
        from worker.model.tiny import ensure_model

        built = ensure_model(home=settings.home)
        if profile.adapters is None:
            return ModelFiles(built.base, built.adapter, "tiny-random", "tiny-random-lora")

    def fetch(repo: str, revision: str | None) -> Path:
        return Path(fetch_repo(repo, revision, profile, settings, weights=False))

    named = adapter_folders(profile, settings, fetch, check_weights=False)
    adapter = named[0].folder if named else None
    adapter_id = named[0].id if named else None
    if profile.tiny:
        return ModelFiles(built.base, adapter, "tiny-random", adapter_id)
    base, revision = profile.base, profile.base_revision
    if base is None:
        if adapter is None or not (adapter / "adapter_config.json").is_file():
            raise ModelLoadError(f"{adapter_id} has no adapter_config.json naming its base model")
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{adapter_id}'s adapter_config.json names no base model; set 'base'")
        revision = cfg.get("revision") or revision
    return ModelFiles(_folder(base, revision, profile, settings), adapter, base, adapter_id)
