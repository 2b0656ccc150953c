"""Choosing ``max_batch_size: auto``: decode throughput measured per batch size, cached on disk.

:func:`search_batch_sizes` and :func:`pick_batch_size` are pure (the measurement is injected);
:class:`Autotuner` times real decode steps of the loaded model over a :class:`SlotCache` and keeps
its choice in ``GENQ_HOME/autotune.json``, per model shape, mode, device and thread count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.engine.cpu import cpu_name, packed_layers
from worker.engine.forward import Forward
from worker.engine.memory import is_oom
from worker.engine.slot_cache import SlotCache

AUTOTUNE_CANDIDATES = (4, 8, 16, 32, 64, 128, 256)
AUTOTUNE_CONTEXT = 256
"""Tokens already in each row's cache while the autotuner times its decode steps."""
AUTOTUNE_TOLERANCE = 0.95
"""The autotuner picks the smallest batch size within this fraction of the best throughput."""
DEFAULT_BATCH_SIZE = 32
"""``max_batch_size: auto`` before (or without) :meth:`Engine.autotune`."""
AUTOTUNE_VERSION = 2
"""Part of the cache key: bump when the search changes, so cached choices are measured again."""


def search_batch_sizes(sizes: Sequence[int], measure: Callable[[int], float]) -> dict[int, float]:
    """Tokens per second per batch size, smallest first, as far as it pays: the search stops at
    the first out-of-memory error, or after two sizes in a row that did not beat every smaller
    size by more than 2%."""
    table: dict[int, float] = {}
    paid: list[bool] = []
    for size in sorted(sizes):
        best_before = max(table.values(), default=0.0)
        try:
            table[size] = measure(size)
        except Exception as exc:
            if not is_oom(exc):
                raise
            break
        paid.append(table[size] > best_before * 1.02)
        if len(paid) >= 3 and not paid[-1] and not paid[-2]:
            break
    return table


def pick_batch_size(table: dict[int, float]) -> int:
    """The smallest size within ``AUTOTUNE_TOLERANCE`` of the best throughput (smaller batches
    finish sooner and hold less memory); ``DEFAULT_BATCH_SIZE`` with nothing measured."""
    if not table:
        return DEFAULT_BATCH_SIZE
    best = max(table.values())
    return min(s for s, tps in table.items() if tps >= AUTOTUNE_TOLERANCE * best)


@dataclass
class Tuned:
    """What the autotuner chose, and the table it chose from."""

    batch_size: int
    tokens_per_second: dict[str, float] = field(default_factory=dict)
    context: int = 0
    seconds: float = 0.0
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "tokens_per_second": self.tokens_per_second,
            "context": self.context,
            "seconds": self.seconds,
            "cached": self.cached,
        }


class Autotuner:
    """Measures decode throughput of one model at candidate batch sizes (see :meth:`tune`)."""

    def __init__(
        self, forward: Forward, *, identity: dict[str, Any], context_length: int, max_batch_tokens: int
    ) -> None:
        self.forward = forward
        self.identity = identity
        """Mode, adapter and anything else that makes a measurement differ (part of the cache key)."""
        self.context_length = context_length
        self.max_batch_tokens = max_batch_tokens

    def tune(
        self,
        candidates: Sequence[int] = AUTOTUNE_CANDIDATES,
        *,
        context: int = AUTOTUNE_CONTEXT,
        steps: int = 3,
        cache_file: Path | None = None,
    ) -> Tuned:
        """Measure decode throughput at each candidate batch size and pick the smallest within
        ``AUTOTUNE_TOLERANCE`` of the best.  A few decode steps per size, on a cache filled with
        ``context`` tokens per row; sizes over the token cap are skipped, and the search stops at
        the first out-of-memory or when a bigger batch stops paying.  With ``cache_file``, a choice
        saved there for the same key is reused and a new one is saved."""
        context = max(1, min(context, self.context_length - steps - 2))
        sizes = sorted(
            {c for c in candidates if c > 0 and c * (context + steps + 2) <= self.max_batch_tokens}
        ) or [1]
        key = self.key(sizes, context, steps)
        if cache_file is not None:
            saved = _read(cache_file).get(key)
            if isinstance(saved, dict) and isinstance(saved.get("batch_size"), int):
                return Tuned(**{**saved, "cached": True})
        started = time.perf_counter()
        table: dict[int, float] = {}
        if self.forward.attention:
            table = search_batch_sizes(sizes, lambda size: self.time_decode(size, context, steps))
        tuned = Tuned(
            batch_size=pick_batch_size(table),
            tokens_per_second={str(s): round(t, 2) for s, t in table.items()},
            context=context,
            seconds=round(time.perf_counter() - started, 2),
        )
        if cache_file is not None:
            _save(cache_file, key, {k: v for k, v in tuned.as_dict().items() if k != "cached"})
        return tuned

    def key(self, sizes: Sequence[int], context: int, steps: int) -> str:
        model = self.forward.model
        config = getattr(model, "config", None)
        shape = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
        device = self.forward.device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        blob = json.dumps(
            {
                "shape": {k: v for k, v in shape.items() if isinstance(v, int | float | str | bool)},
                **self.identity,
                "device": where,
                "threads": torch.get_num_threads(),
                "packed": packed_layers(model) > 0,
                "torch": torch.__version__,
                "sizes": list(sizes),
                "context": context,
                "steps": steps,
                "v": AUTOTUNE_VERSION,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def time_decode(self, rows: int, context: int, steps: int) -> float:
        """Tokens per second of decode steps with ``rows`` rows of ``context`` cached tokens."""
        fwd = self.forward
        with torch.inference_mode():
            cache = SlotCache(rows, capacity=context + steps + 2)
            gen = torch.Generator().manual_seed(rows)
            vocab = int(getattr(getattr(fwd.model, "config", None), "vocab_size", 1000) or 1000)
            timings: list[float] = []
            for _ in range(steps + 1):  # the first step allocates the cache: not counted
                cache.lengths = [context] * rows  # the same span every step
                step = torch.randint(0, vocab, (rows, 1), generator=gen)
                fwd.sync()
                t0 = time.perf_counter()
                positions, visible = cache.begin_decode(rows)
                logits = fwd(step, visible, positions, cache)
                logits.argmax(dim=-1).tolist()
                fwd.sync()
                timings.append(time.perf_counter() - t0)
            del cache, logits
        return rows / min(timings[1:])


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key`` to the JSON file at ``path`` (atomically; errors ignored)."""
    with contextlib.suppress(OSError, ValueError):
        path.parent.mkdir(parents=True, exist_ok=True)
        everything = _read(path)
        everything[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
        os.replace(tmp, path)
