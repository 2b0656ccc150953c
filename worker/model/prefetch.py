"""``genq-worker prefetch``: download only what a profile needs, and say what it will cost.

Download size is not runtime memory: a 7B checkpoint is ~15 GB on disk in bf16, ~5.5 GB of GPU
memory in nf4 and ~30 GB of RAM in fp32.  The report gives all three, per repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.core.profiles import Profile, load_profile
from worker.core.settings import Settings, get_settings
from worker.model.capability import estimate
from worker.model.loading import fetch_repo, resolve_sources


def _repos(profile: Profile) -> list[tuple[str, str | None, str]]:
    out: list[tuple[str, str | None, str]] = []
    if profile.adapter and not Path(profile.adapter).expanduser().is_dir():
        out.append((profile.adapter, profile.adapter_revision, "adapter"))
    if profile.base and not Path(profile.base).expanduser().is_dir():
        out.append((profile.base, profile.base_revision, "base"))
    return out


def prefetch(
    name_or_path: str, *, dry_run: bool = False, settings: Settings | None = None
) -> list[dict[str, Any]]:
    settings = settings or get_settings()
    profile = load_profile(name_or_path, settings)
    lines: list[dict[str, Any]] = []
    for repo, revision, role in _repos(profile):
        plan = fetch_repo(repo, revision, profile, settings, dry_run=True)
        total = sum(int(f.file_size or 0) for f in plan)
        cached = sum(int(f.file_size or 0) for f in plan if f.is_cached)
        lines.append(
            {
                "repo": repo,
                "role": role,
                "revision": revision,
                "files": len(plan),
                "download_bytes": total - cached,
                "total_bytes": total,
                "cached_bytes": cached,
                "dry_run": dry_run,
            }
        )
    if not dry_run:
        sources = resolve_sources(profile, settings)
        est = estimate(sources.base, sources.adapter)
        lines.append(
            {
                "profile": profile.name,
                "runtime_memory": {
                    "nf4_gpu_bytes": est.nf4_bytes,
                    "nf4_cpu_bytes": est.nf4_cpu_bytes,
                    "fp32_cpu_bytes": est.fp32_bytes,
                    "note": "weights only; add room for the KV cache (nf4.kv_cache_headroom)",
                },
                "params": est.total_params,
                "base": str(sources.base),
                "adapter": str(sources.adapter) if sources.adapter else None,
            }
        )
    return lines
