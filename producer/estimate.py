"""`genq estimate FILE --profile P`: tokens, memory and time before running anything.

* **tokens in**: each item rendered and tokenised the way a worker will (the profile's own
  tokenizer and chat template, :mod:`producer.tokens`, no torch);
* **tokens out**: a bound, each item's ``max_new_tokens`` (item, job, profile; cut to the
  context) times its ``n``;
* **memory per mode**: the weights (:func:`worker.model.capability.estimate`, from the
  safetensors headers when the weights are here, else from the config) and the KV cache one row
  of the longest item needs;
* **time per worker class**: the bound divided by the completion tokens per second that workers
  of this profile measured and published with their heartbeats (kept in Redis after they stop),
  or that embedded `genq run`s measured on this machine; with live workers, the whole fleet too.

The model's files come through :mod:`worker.model.files`, imported when the command runs (the
layer contract names that one import), which reads no weights and imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.inputs import stream_items
from producer.options import input_limits
from producer.tokens import PromptCounter
from worker.core.profiles import Profile
from worker.core.schema import GenParams
from worker.core.settings import Settings
from worker.core.throughput import Throughput, read_local


@dataclass
class TokenCounts:
    items: int = 0
    samples: int = 0
    prompt: int = 0
    prompt_max: int = 0
    completion_bound: int = 0
    longest_row: int = 0
    """Prompt + completion tokens of the longest item: what one row's KV cache holds."""
    too_long: int = 0
    """Items whose prompt does not fit the context (they will error)."""
    invalid: int = 0


@dataclass
class Estimate:
    file: str
    profile: str
    model: str
    tokens: TokenCounts
    memory: dict[str, Any]
    speeds: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        t = self.tokens
        return {
            "file": self.file,
            "profile": self.profile,
            "model": self.model,
            "items": t.items,
            "samples": t.samples,
            "tokens": {
                "prompt": t.prompt,
                "prompt_max": t.prompt_max,
                "completion_bound": t.completion_bound,
                "total_bound": t.prompt + t.completion_bound,
            },
            "too_long": t.too_long,
            "invalid": t.invalid,
            "memory": self.memory,
            "time": self.speeds,
            "fleet": self.fleet,
            "notes": self.notes,
        }


def count_tokens(
    path: str | os.PathLike[str],
    profile: Profile,
    counter: PromptCounter,
    context: int,
    *,
    params: GenParams,
    system_prompt: str | None,
    skip_invalid: bool,
) -> TokenCounts:
    counts = TokenCounts()
    defaults = profile.default_params
    for item in stream_items(path, skip_invalid=skip_invalid, limits=input_limits(profile)):
        counts.items += 1
        if item.invalid is not None:
            counts.invalid += 1
            continue
        resolved = item.params.over(params).over(defaults)
        n = resolved.n or 1
        prompt = counter.count(item, system_prompt)
        counts.samples += n
        counts.prompt += prompt
        counts.prompt_max = max(counts.prompt_max, prompt)
        if prompt >= context:
            counts.too_long += 1
            continue
        new = min(int(resolved.max_new_tokens or 1), context - prompt)
        counts.completion_bound += n * new
        counts.longest_row = max(counts.longest_row, prompt + new)
    return counts


def memory(files: Any, longest_row: int) -> dict[str, Any]:
    """Weights per mode and the KV cache of one row of the longest item, in bytes."""
    weights = files.weights()
    cfg = files.config()
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // max(heads, 1))
    per_token = 2 * layers * kv_heads * head_dim
    return {
        "weights_bytes": {
            "fp32": weights.fp32_bytes,
            "nf4_gpu": weights.nf4_bytes,
            "nf4_cpu": weights.nf4_cpu_bytes,
        },
        "parameters": weights.total_params,
        "weights_from": weights.source,
        "kv_cache_per_row_bytes": {
            "fp32": per_token * 4 * longest_row,
            "nf4_gpu": per_token * 2 * longest_row,
        },
    }


def speeds(
    measured: list[Throughput], live: list[dict[str, Any]], bound: int, profile: str
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One row per worker class (the latest measurement wins), and the live fleet."""
    latest: dict[str, Throughput] = {}
    for t in measured:
        if t.key not in latest or t.measured_at > latest[t.key].measured_at:
            latest[t.key] = t
    mine = [w for w in live if w.get("profile") == profile and float(w.get("tokens_per_second") or 0) > 0]
    rows = []
    for t in sorted(latest.values(), key=lambda t: -t.tokens_per_second):
        workers = [
            w
            for w in mine
            if (w.get("mode"), w.get("device"), w.get("hardware")) == (t.mode, t.device, t.hardware)
        ]
        rows.append(
            {
                "worker_class": t.worker_class,
                "mode": t.mode,
                "device": t.device,
                "hardware": t.hardware,
                "tokens_per_second": t.tokens_per_second,
                "seconds": round(bound / t.tokens_per_second, 1),
                "source": t.source,
                "measured_at": t.measured_at,
                "live_workers": len(workers),
            }
        )
    fleet = None
    if mine:
        rate = sum(float(w["tokens_per_second"]) for w in mine)
        fleet = {
            "live_workers": len(mine),
            "tokens_per_second": round(rate, 2),
            "seconds": round(bound / rate, 1),
        }
    return rows, fleet


def estimate_file(
    path: Path,
    profile: Profile,
    settings: Settings,
    *,
    params: GenParams,
    system_prompt: str | None = None,
    skip_invalid: bool = False,
    measured: list[Throughput] | None = None,
    live: list[dict[str, Any]] | None = None,
) -> Estimate:
    from worker.model.files import model_files

    files = model_files(profile, settings)
    cfg = files.config()
    context = profile.limits.context_length or int(str(cfg.get("max_position_embeddings", 4096)))
    counts = count_tokens(
        path,
        profile,
        PromptCounter(files.base),
        context,
        params=params,
        system_prompt=system_prompt,
        skip_invalid=skip_invalid,
    )
    report = Estimate(str(path), profile.name, files.name, counts, memory(files, counts.longest_row))
    found = list(measured or []) + read_local(settings.home, profile.name)
    report.speeds, report.fleet = speeds(found, live or [], counts.completion_bound, profile.name)
    if not report.speeds:
        report.notes.append(
            f"no measured speed for {profile.name} yet: run a job (genq run, or workers) and "
            "estimate again; workers publish what they measure with their heartbeats"
        )
    if counts.too_long:
        report.notes.append(
            f"{counts.too_long} items have prompts longer than the context ({context} tokens)"
        )
    return report


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def render(report: Estimate) -> list[str]:
    """The human table."""
    t, m = report.tokens, report.memory
    w, kv = m["weights_bytes"], m["kv_cache_per_row_bytes"]
    lines = [
        f"{report.file}: {t.items} items ({t.samples} samples) for {report.profile} ({report.model})",
        f"  tokens in     {t.prompt:,} (longest prompt {t.prompt_max:,})",
        f"  tokens out    at most {t.completion_bound:,}",
        f"  memory        weights: fp32 {_size(w['fp32'])}, nf4 on a GPU {_size(w['nf4_gpu'])}, "
        f"nf4 on a CPU {_size(w['nf4_cpu'])} ({m['parameters']:,} parameters, from {m['weights_from']})",
        f"                KV cache per row of the longest item: fp32 {_size(kv['fp32'])}, "
        f"nf4 on a GPU {_size(kv['nf4_gpu'])}",
    ]
    if report.speeds:
        rows = [("worker class", "tok/s", f"time for {t.completion_bound:,} tokens", "measured by", "live")]
        rows += [
            (
                s["worker_class"],
                f"{s['tokens_per_second']:.1f}",
                _duration(s["seconds"]),
                s["source"],
                str(s["live_workers"]),
            )
            for s in report.speeds
        ]
        if report.fleet:
            f = report.fleet
            rows.append(
                (
                    f"all {f['live_workers']} live workers",
                    f"{f['tokens_per_second']:.1f}",
                    _duration(f["seconds"]),
                    "",
                    "",
                )
            )
        width = [max(len(r[c]) for r in rows) for c in range(5)]
        lines.append("  time")
        lines += ["    " + "  ".join(v.ljust(width[c]) for c, v in enumerate(r)).rstrip() for r in rows]
    lines += [f"  note: {n}" for n in report.notes]
    return lines
