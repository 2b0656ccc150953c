"""Generation speed as measured on real runs, per worker class: what `genq estimate` divides by.

A worker class is a profile, a mode, a device and the hardware's name (the CPU model, or the
GPU's).  Workers publish their measured completion tokens per second with every heartbeat
(:meth:`worker.store.workers.WorkerRegistry.record_throughput`, kept after the worker stops); an
embedded `genq run` records its own at the end in ``GENQ_HOME/throughput.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE = "throughput.json"


@dataclass(frozen=True)
class Throughput:
    profile: str
    mode: str
    device: str
    hardware: str
    tokens_per_second: float
    measured_at: float
    source: str
    """``worker:<name>`` or ``embedded``."""

    @property
    def key(self) -> str:
        return f"{self.profile}|{self.mode}|{self.device}|{self.hardware}"

    @property
    def worker_class(self) -> str:
        return f"{self.mode} on {self.device} ({self.hardware})"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Throughput | None:
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(**data)
        except (ValueError, TypeError):
            return None


def read_local(home: Path, profile: str) -> list[Throughput]:
    """The embedded runs' figures for ``profile`` (none when the file is missing or unreadable)."""
    try:
        data = json.loads((home / FILE).read_text())
    except (OSError, ValueError):
        return []
    found = (Throughput.from_json(json.dumps(v)) for v in data.values()) if isinstance(data, dict) else ()
    return [t for t in found if t is not None and t.profile == profile]


def record_local(home: Path, measured: Throughput) -> None:
    """Keep ``measured`` in ``home/throughput.json`` (atomically; the latest per class wins)."""
    path = home / FILE
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[measured.key] = asdict(measured)
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def now() -> float:
    return time.time()
