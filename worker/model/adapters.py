"""A profile's LoRA adapters: their folders, and attaching them all to the one base model.

A profile names one adapter (``adapter``, called ``default``) or several (``adapters``, by name);
a worker loads the base once and every adapter of its profile, never one a job names by path or
repository (a job names an adapter only by a name the profile lists).

* fp32 with one adapter: merged into the base weights (``merge_and_unload``), so generation costs
  what the base costs.
* fp32 with several, and nf4 always: unmerged.  Each row of a batch names its adapter, and the
  LoRA layers apply to each row its own (:mod:`worker.engine.adapters`).  Merging the default
  and applying the others on top would be wrong (their rows would carry the default's delta too)
  unless that delta were subtracted again for them, which costs more than leaving all unmerged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.core.errors import ModelLoadError
from worker.core.profiles import Profile
from worker.core.settings import Settings

Fetch = Callable[[str, str | None], Any]
"""Downloads a hub repository at a revision; returns its local folder."""

AdapterState = Literal["merged", "unmerged", "none"]


@dataclass(frozen=True)
class AdapterFolder:
    name: str
    folder: Path
    id: str
    """How results name it after the base (``base:id``): the repository, the folder, or
    ``tiny-random-lora[-name]``."""


def adapter_folders(
    profile: Profile, settings: Settings, fetch: Fetch, *, check_weights: bool = True
) -> list[AdapterFolder]:
    """Every adapter of ``profile``, the default first, each a local folder (downloaded with
    ``fetch`` when it is a hub repository).  The tiny model's own adapter (a ``tiny: true``
    profile without ``adapters``) is the caller's."""
    from worker.model.tiny import ensure_adapter

    found: list[AdapterFolder] = []
    for name, source in profile.named_adapters.items():
        if source.tiny is not None:
            folder, ident = ensure_adapter(source.tiny, home=settings.home), f"tiny-random-lora-{name}"
        elif source.path is not None:
            folder, ident = Path(source.path).expanduser(), source.path
            if not folder.is_dir():
                raise ModelLoadError(f"adapter {name!r}: {source.path} is not a folder ({profile.source})")
        else:
            assert source.repo is not None
            folder, ident = Path(fetch(source.repo, source.revision)), source.repo
        check_folder(folder, ident, profile, weights=check_weights)
        found.append(AdapterFolder(name, folder, ident))
    default = profile.default_adapter_name
    found.sort(key=lambda a: a.name != default)
    return found


def check_folder(folder: Path, ident: str, profile: Profile, *, weights: bool = True) -> None:
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{ident} has no adapter_config.json: is it a peft LoRA adapter?")
    if weights and profile.use_safetensors and not list(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{ident} has no safetensors weights; genq refuses pickle-based adapter files "
            f"unless {profile.source} sets use_safetensors: false"
        )


def attach(model: Any, adapters: list[AdapterFolder], mode: str) -> tuple[Any, AdapterState]:
    """``model`` with every adapter loaded (the first one active); merged only in fp32 with one
    adapter (see the module)."""
    if not adapters:
        return model, "none"
    from peft import PeftModel

    first, rest = adapters[0], adapters[1:]
    try:
        model = PeftModel.from_pretrained(
            model, str(first.folder), adapter_name=first.name, is_trainable=False
        )
        for adapter in rest:
            model.load_adapter(str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        which = ", ".join(a.id for a in adapters)
        raise ModelLoadError(f"loading adapter {which} failed: {exc}") from exc
    if mode == "fp32" and not rest:
        return model.merge_and_unload(), "merged"
    return model, "unmerged"
