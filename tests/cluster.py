"""A local genq cluster for tests and benchmarks: a real redis-server on a free port, real
``genq-worker start`` processes, and small helpers to feed and wait on them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from tests.ledger import log_events as log_events  # one JSON-log parser, re-exported here
from tests.ledger import parse_events as parse_events
from worker.chunks import chunk_number, chunk_range
from worker.core.states import FINAL_STATUSES

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc``, then SIGKILL it if it has not exited within ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """A real ``redis-server`` on a free port; ``restart()`` keeps its append-only file.  With
    ``prefix`` (``ip netns exec NS``) it runs elsewhere, bound to ``host``; :meth:`client` then
    talks to it through its Unix socket."""

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        appendonly: bool = True,
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.host = host
        self.prefix = prefix or []
        self.socket = folder / "redis.sock"
        if len(str(self.socket)) > 100:  # the limit of a Unix socket's path
            self.socket = Path(tempfile.mkdtemp(prefix="genq-redis-")) / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def local_url(self) -> str:
        """The URL of its Unix socket: reachable whatever happens to the network."""
        return f"unix://{self.socket}?db=0" + (f"&password={self.password}" if self.password else "")

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            *self.prefix,
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.host != "127.0.0.1":  # a test network of namespaces: its clients are other hosts
            args += ["--protected-mode", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.2)
                    s.connect(str(self.socket))
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        stop_process(self.proc)  # SIGTERM: redis flushes the append-only file and exits
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.local_url, decode_responses=True)


def env_for(redis_url: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if redis_url:
        env["GENQ_BROKER_URL"] = redis_url
    env.update(extra)
    return env


REPO = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A real ``genq-worker start`` process (its own Python, its own model load)."""

    def __init__(
        self,
        redis_url: str,
        log_path: Path,
        *,
        profile: str = "tiny-random",
        mode: str = "fp32",
        name: str | None = None,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        observe_url: str | None = None,
        args: list[str] | None = None,
    ) -> None:
        """``prefix`` runs it elsewhere (``ip netns exec NS``); ``observe_url`` is how this process
        sees the Redis it uses (default: ``redis_url``); ``args`` are more ``start`` options."""
        self.redis_url = redis_url
        self.prefix = prefix or []
        self.observe_url = observe_url or redis_url
        self.log_path = log_path
        self.profile = profile
        self.mode = mode
        self.name = name or f"w-{mode}-{free_port()}"
        self.concurrency = concurrency
        self.extra_env = env or {}
        self.extra_args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.spawned_at = 0.0
        """``time.time()`` when the current process was started: its heartbeats and chunks are
        newer, those of a process killed before it are older."""

    def start(self, wait: bool = True, timeout: float = 120.0) -> WorkerProcess:
        import sys

        env = env_for(self.redis_url, **self.extra_env)
        env.setdefault("GENQ_HEARTBEAT_INTERVAL", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.spawned_at = time.time()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "worker.main",
                "start",
                "--profile",
                self.profile,
                "--mode",
                self.mode,
                "--name",
                self.name,
                "--concurrency",
                str(self.concurrency),
                *self.extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until this process's heartbeat is in Redis (the model is loaded and it consumes).  A
        heartbeat left by a process of the same name that was killed a moment ago does not count."""
        import json

        r = redis.Redis.from_url(self.observe_url, decode_responses=True)
        deadline = time.monotonic() + timeout
        prefix = f"genq:worker:{self.name}"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                for key in r.scan_iter(prefix + "*", count=100):
                    raw = r.get(key)
                    if raw and float(json.loads(raw).get("started_at") or 0) >= self.spawned_at:
                        time.sleep(0.5)  # heartbeat precedes the consumer by a moment
                        return
            except redis.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s; log: {self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no chance to clean up or hand anything back."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int | None:
        import signal

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def stop(self) -> None:
        if self.alive():
            self.terminate(20)
        else:
            self.kill()


def write_prompts(path: Path, n: int, *, max_new_tokens: int = 8, prefix: str = "p") -> Path:
    """A native JSONL file of ``n`` short prompts with ids ``<prefix>0000``…"""
    import json

    words = ["fever", "cough", "the patient", "blood pressure", "dose of aspirin", "chest pain", "diabetes"]
    with open(path, "w") as fh:
        for i in range(n):
            prompt = f"{words[i % len(words)]} {i} " + " ".join(words[: (i % 5) + 1])
            fh.write(
                json.dumps({"id": f"{prefix}{i:04d}", "prompt": prompt, "max_new_tokens": max_new_tokens})
                + "\n"
            )
    return path


def in_flight(
    r: redis.Redis, job_id: str, *, worker: str | None = None, since: float = 0.0
) -> dict[str, int]:
    """Chunks of ``job_id`` a worker is running (started at or after ``since``; by ``worker`` when
    given), each with how many of its items have no result yet."""
    import json

    key = f"genq:job:{job_id}"
    out: dict[str, int] = {}
    for raw_chunk, value in r.hgetall(f"{key}:running").items():
        chunk = str(raw_chunk)
        name, _, started = str(value).rpartition("|")
        if (worker is not None and name != worker) or float(started or 0) < since:
            continue
        spec = json.loads(str(r.hget(key, "spec") or "{}"))
        n = chunk_number(chunk)
        if n is not None:
            indices = list(chunk_range(n, int(spec.get("total", 0)), int(spec.get("chunk_size", 1))))
        else:
            raw = r.hget(f"{key}:chunks", chunk)
            indices = json.loads(str(raw)) if raw else []
        if indices:
            done = r.hmget(f"{key}:results", [str(i) for i in indices])
            out[chunk] = sum(1 for d in done if d is None)
        else:
            out[chunk] = 0
    return out


def kill_mid_chunk(worker: WorkerProcess, r: redis.Redis, job_id: str, timeout: float = 120.0) -> int | None:
    """Wait until ``worker`` is generating a chunk of ``job_id`` that still has items without a
    result, then SIGKILL it.  Returns how many items of its chunks were left without a result
    (0 when the chunk finished between the look and the kill), or None, killing nothing, when the
    job ended first."""

    def busy_or_over() -> str:
        if final_status(r, job_id):
            return "over"
        running = in_flight(r, job_id, worker=worker.name, since=worker.spawned_at)
        return "busy" if any(n > 0 for n in running.values()) else ""

    if wait_for(busy_or_over, timeout=timeout, interval=0.01, what=f"{worker.name} mid-chunk") == "over":
        return None
    since = worker.spawned_at
    worker.kill()
    return sum(in_flight(r, job_id, worker=worker.name, since=since).values())


def job_counts(r: redis.Redis, job_id: str) -> dict[str, int | str]:
    """``status`` and the counts of a job, read straight from the store (no expiry check)."""
    raw = r.hgetall(f"genq:job:{job_id}")
    out: dict[str, int | str] = {"status": str(raw.get("status", ""))}
    for name in ("total", "succeeded", "errored", "cancelled", "expired"):
        out[name] = int(raw.get(name, 0))
    return out


def final_status(r: redis.Redis, job_id: str) -> str:
    """The job's status once it is final (completed, cancelled, expired), else ""."""
    status = str(job_counts(r, job_id)["status"])
    return status if status in FINAL_STATUSES else ""


def run_genq(
    redis_url: str | None,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``genq ARGS`` in a subprocess against ``redis_url`` (none: embedded), run after ``prefix``
    (``ip netns exec NS``) when given."""
    import sys

    full = env_for(redis_url, **(env or {}))
    if redis_url is None:
        full.pop("GENQ_BROKER_URL", None)
    proc = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "producer.cli", *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"genq {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def wait_for(
    predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.2, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
