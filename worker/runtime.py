"""The process-wide worker state: the model loaded once, the engine, the store, the heartbeat.

``genq-worker start`` builds it before consuming; under plain ``celery -A worker.queue.app worker`` it is
built from ``GENQ_PROFILE``/``GENQ_MODE`` when the worker process starts (prefork children) or on
the first task.  It never loads a model a job asks for: only the profile it was started with.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.core.errors import ConfigError
from worker.core.logs import get_logger
from worker.core.profiles import Profile
from worker.core.settings import Settings, get_settings
from worker.core.states import Mode
from worker.core.throughput import Throughput

if TYPE_CHECKING:
    from worker.chunks import Engine
    from worker.model.loading import Loaded
    from worker.store import RedisStore


@dataclass
class Stats:
    items: int = 0
    tokens: int = 0
    chunks: int = 0
    started_at: float = field(default_factory=time.time)
    rate: float = 0.0
    """Completion tokens per second while generating (exponentially weighted)."""
    current: str | None = None
    current_since: float | None = None
    """``time.time()`` when the current chunk started (None between chunks)."""
    current_done: int = 0
    """Results the current chunk has produced so far (kept or not)."""
    done: int = 0
    """Results the chunks before it produced (kept or not)."""
    busy_seconds: float = 0.0
    """Seconds spent running those chunks."""

    def add(self, items: int, tokens: int, seconds: float) -> None:
        self.items += items
        self.tokens += tokens
        if seconds > 0 and tokens:
            inst = tokens / seconds
            self.rate = inst if self.rate == 0 else 0.7 * self.rate + 0.3 * inst

    def start(self, current: str) -> None:
        self.current, self.current_since, self.current_done = current, time.time(), 0

    def progress(self, results: int) -> None:
        self.current_done += results

    def stop(self) -> None:
        if self.current_since is not None:
            self.busy_seconds += max(0.0, time.time() - self.current_since)
        self.done += self.current_done
        self.current, self.current_since, self.current_done = None, None, 0

    def items_per_second(self) -> float:
        """This worker's measured speed: results per second while running chunks, the current
        one included (0 before its first result)."""
        seconds = self.busy_seconds
        if self.current_since is not None:
            seconds += max(0.0, time.time() - self.current_since)
        items = self.done + self.current_done
        return items / seconds if items and seconds > 0 else 0.0


class Runtime:
    def __init__(self, settings: Settings | None = None, name: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stop_event = threading.Event()
        self.stats = Stats()
        self.engine: Engine | None = None
        self.loaded: Loaded | None = None
        self.profile: Profile | None = None
        self.mode: Mode | None = None
        self.backup_sent_at: float | None = None
        """When this worker last published a backup chunk (cleared when it runs a chunk)."""
        self.beat_hooks: list[Callable[[], None]] = []
        """What the queue layer runs on each heartbeat (the lease sweep, backup execution)."""
        self.queues: list[str] = []
        """The broker queues this process consumes, in order (set by the queue layer): each
        heartbeat registers it as their consumer and tops them up from the jobs' backlogs."""
        self.targets: list[str | tuple[str, str]] = []
        """What a dispatch of this process tops up (set with ``queues`` by the queue layer:
        each mode queue also from its level's ``any`` jobs; worker.queue.routing)."""
        self.rescues: list[tuple[str, str]] = []
        """The other modes' queues (each with its level's ``any`` queue) whose ``any`` messages
        each heartbeat gives back when no live worker consumes them (set with ``queues``)."""
        self._store: RedisStore | None = None
        self._heartbeat: threading.Thread | None = None
        self._hardware: str | None = None
        self.load_seconds: float | None = None
        """How long loading the model took (the ``genq_model_load_seconds`` gauge)."""
        self.log = get_logger(worker=self.name)

    @property
    def profile_name(self) -> str | None:
        return self.profile.name if self.profile else None

    def rename(self, name: str) -> None:
        self.name = name
        self.log = get_logger(worker=name)

    @property
    def store(self) -> RedisStore:
        if self._store is None:
            from worker.store import RedisStore

            self._store = RedisStore(settings=self.settings)
        return self._store

    def load(self, profile_name: str | None = None, mode: str | None = None) -> Engine:
        """Load the profile's model once in this process; returns its engine (at once when it is
        already loaded)."""
        if self.engine is not None:
            return self.engine
        from worker.core.profiles import load_profile
        from worker.engine import build_engine
        from worker.model.loading import load_model

        name = profile_name or self.settings.profile
        if not name:
            raise ConfigError("no profile: pass --profile or set GENQ_PROFILE")
        self.profile = load_profile(name, self.settings)
        started = time.perf_counter()
        self.loaded = load_model(self.profile, (mode or self.settings.mode), settings=self.settings)
        self.mode = self.loaded.mode
        self.engine = build_engine(self.loaded, settings=self.settings, worker=self.name)
        self.load_seconds = time.perf_counter() - started
        return self.engine

    def serves(self, profile: str) -> bool:
        return self.profile is not None and self.profile.name == profile

    # --- heartbeat ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "profile": self.profile.name if self.profile else None,
            "mode": self.mode,
            "device": loaded.device if loaded else None,
            "placement": loaded.placement if loaded else None,
            "items": self.stats.items,
            "tokens": self.stats.tokens,
            "chunks": self.stats.chunks,
            "tokens_per_second": round(self.stats.rate, 2),
            "hardware": self.hardware,
            "current": self.stats.current,
            "current_since": self.stats.current_since,
            "items_per_second": round(self.stats.items_per_second(), 4),
            "started_at": self.stats.started_at,
            "seen_at": time.time(),
        }

    @property
    def hardware(self) -> str | None:
        """The CPU model, or the GPU's name: with the mode and device, this worker's class."""
        if self.loaded is None:
            return None
        if self._hardware is None:
            from worker.engine.cpu import cpu_name

            if self.loaded.device == "cuda":
                import torch

                self._hardware = str(torch.cuda.get_device_name(0))
            else:
                self._hardware = cpu_name()
        return self._hardware

    def throughput(self) -> Throughput | None:
        """The measured speed of this worker's class (None before its first chunk)."""
        if self.profile is None or self.mode is None or self.loaded is None or self.stats.rate <= 0:
            return None
        return Throughput(
            profile=self.profile.name,
            mode=str(self.mode),
            device=self.loaded.device,
            hardware=self.hardware or "?",
            tokens_per_second=round(self.stats.rate, 2),
            measured_at=time.time(),
            source=f"worker:{self.name}",
        )

    def beat(self) -> None:
        try:
            ttl = 3 * self.settings.heartbeat_interval
            self.store.heartbeat(self.name, self.info(), ttl=ttl)
            if self.queues:
                self.store.register_consumer(self.name, self.queues, ttl)
                given = self.store.rescue(self.rescues)  # any jobs' chunks on a mode left unserved
                if given:
                    self.log.info("stranded_chunks_returned", messages=given)
                self.store.dispatch(self.targets)  # makes up a dispatch lost to a crash
            measured = self.throughput()
            if measured is not None:
                self.store.record_throughput(measured)
        except Exception as exc:  # a missed heartbeat must never stop the work
            self.store_failed("heartbeat_failed", exc)
        for hook in self.beat_hooks:
            try:
                hook()
            except Exception as exc:  # nor must what runs with it
                name = getattr(getattr(hook, "func", hook), "__name__", "?")
                self.store_failed("heartbeat_hook_failed", exc, hook=name)

    def store_failed(self, event: str, exc: BaseException, **fields: Any) -> None:
        """A store call failed and the work goes on: at maxmemory the worker's one line a minute
        says so (:func:`~worker.store.memory.full_notice`, for every part of the worker), else a
        warning ``event`` with the error."""
        from worker.store.memory import full_notice, is_full

        if is_full(exc):
            full_notice().report(self.store.r, self.store.url_display, self.log, exc)
        else:
            self.log.warning(event, error=str(exc)[:200], **fields)

    def start_heartbeat(self) -> None:
        if self._heartbeat is not None or not self.settings.broker:
            return

        def loop() -> None:
            while not self.stop_event.wait(self.settings.heartbeat_interval):
                self.beat()

        self.beat()
        self._heartbeat = threading.Thread(target=loop, name="genq-heartbeat", daemon=True)
        self._heartbeat.start()

    def shutdown(self) -> None:
        self.stop_event.set()
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.remove_worker(self.name)
                self._store.unregister_consumer(self.name, self.queues)


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


def set_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime
