"""Live workers: each heartbeats a JSON description with a TTL; the index is pruned on read."""

from __future__ import annotations

import json
import time
from typing import Any

from worker.core.throughput import Throughput
from worker.store.base import StoreBase
from worker.store.keys import THROUGHPUT, WORKERS_INDEX, worker_key


class WorkerRegistry(StoreBase):
    def heartbeat(self, name: str, info: dict[str, Any], ttl: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(worker_key(name), json.dumps(info), ex=max(1, int(ttl)))
        pipe.zadd(WORKERS_INDEX, {name: time.time()})
        self._call(pipe.execute)

    def remove_worker(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_INDEX, name)
        self._call(pipe.execute)

    def workers(self) -> list[dict[str, Any]]:
        names = self._call(self.r.zrange, WORKERS_INDEX, 0, -1)
        if not names:
            return []
        raw = self._call(self.r.mget, [worker_key(n) for n in names])
        live = []
        for name, value in zip(names, raw, strict=True):
            if value is None:
                self._call(self.r.zrem, WORKERS_INDEX, name)
            else:
                live.append(json.loads(value))
        return live

    # --- measured speed per worker class (kept after the workers stop) ---------------------------

    def record_throughput(self, measured: Throughput) -> None:
        self._call(self.r.hset, THROUGHPUT, measured.key, measured.to_json())

    def throughputs(self, profile: str) -> list[Throughput]:
        raw = self._call(self.r.hgetall, THROUGHPUT) or {}
        found = (Throughput.from_json(v) for v in raw.values())
        return [t for t in found if t is not None and t.profile == profile]
