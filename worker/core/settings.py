"""The one place that reads environment variables.

Every setting is typed and documented where it is declared.  ``Settings.from_env()`` reads
``GENQ_*`` (plus ``HF_TOKEN``); a bad value raises :class:`~worker.core.errors.ConfigError` naming the
variable.  Nothing else in genq calls ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from worker.core.errors import ConfigError

ENV_PREFIX = "GENQ_"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _default_configs() -> Path:
    """The checkout's configs/ (editable install, docker image), else the copy pip installs in
    ``<prefix>/share/genq/configs``."""
    import sys

    here = PROJECT_ROOT / "configs"
    installed = Path(sys.prefix) / "share" / "genq" / "configs"
    return here if here.is_dir() or not installed.is_dir() else installed


def _default_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "genq"


class Settings(BaseModel):
    """Typed settings.  The environment variable for field ``x`` is ``GENQ_X``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: SecretStr | None = None
    """Redis URL (``redis://``, ``rediss://``, with an optional password; a Unix socket as
    ``unix:///path/redis.sock?db=0`` or Celery's ``redis+socket:///path/redis.sock?virtual_host=0``)
    used for both the Celery broker and the job store.  Unset: ``genq run`` works embedded, in
    one process."""

    visibility_timeout: int = Field(21600, ge=1)
    """The backstop behind chunk leases: seconds after its last lease renewal before kombu itself
    puts an unacknowledged chunk back on its queue.  Live workers renew their chunks' leases and
    a dead worker's chunk returns after ``GENQ_LEASE_SECONDS``, so this only matters when no genq
    worker sweeps expired leases.  Keep it long; kombu's sweep interval is derived from it."""

    lease_seconds: int = Field(30, ge=3)
    """A worker's hold on a chunk: it renews the lease every third of this while the chunk runs,
    however long that is; a chunk whose lease lapsed (its worker died or lost Redis) is put back
    on its queue by the next heartbeat of any live worker, so it is back within about this plus
    one heartbeat interval.  The visibility timeout caps it when it is lower."""

    recovery_seconds: float = Field(15.0, ge=0)
    """Seconds a live job may sit quiet (pending items, an empty backlog, no chunk running, counts
    unmoved) before the fleet looks for pending items whose message was lost (kombu takes a
    message off its queue before it records it as unacknowledged: a Redis or worker stopped
    between the two loses it) and publishes them again (0: never look)."""

    backup: bool = True
    """Backup execution at a job's tail: a worker with nothing queued for its profile and mode
    takes over the unfinished items of the chunk expected to finish last on a slower worker, when
    it would finish them sooner (one backup per chunk; first write wins keeps results exactly
    once, and the work done twice is counted as wasted tokens)."""

    chunk_time_box: float = Field(600.0, ge=0)
    """Seconds a chunk runs on one worker before what is left of it is handed back as a new chunk
    that any worker may take (0: no time box), so a chunk's work is bounded in time on every
    worker class whatever its size."""

    max_attempts: int = Field(3, ge=1)
    """Deliveries of one chunk before it is split to isolate an item that kills workers; an item
    alone in its chunk past this many attempts is recorded as ``worker_lost``."""

    queue_depth: int = Field(2, ge=1)
    """The fewest chunk messages kept waiting on a broker queue while jobs have chunks left; the
    dispatcher keeps ``max(this, live workers consuming the queue + 1)`` there and holds the rest
    in each job's backlog, so a job submitted later gets its turn within about one chunk per
    worker (see docs/OPERATIONS.md, "Several jobs on one fleet")."""

    result_ttl: int = Field(7 * 24 * 3600, ge=60)
    """Seconds a finished job (inputs, results, counts) is kept in Redis."""

    submit_ttl: int = Field(24 * 3600, ge=60)
    """Seconds a partial job (a submit that was interrupted before every chunk was published)
    is kept, so that running the same `genq submit` again resumes it; then it is gone."""

    heartbeat_interval: float = Field(5.0, gt=0)
    """Seconds between worker heartbeats; a worker is listed while its heartbeat is fresher than
    three intervals."""

    home: Path = Field(default_factory=_default_home)
    """genq's own folder: the tiny model cache and, by default, the offload folder."""

    offload_folder: Path | None = None
    """Where ``device_map="auto"`` may put layers that fit neither on the GPU nor in RAM.
    Default: ``<home>/offload``.  Git-ignored; can be large."""

    configs_dir: Path = Field(default_factory=lambda: _default_configs())
    """Where profiles are looked up by name (``--profile NAME`` → ``<configs_dir>/NAME.yaml``)."""

    log_format: Literal["auto", "json", "console"] = "auto"
    """``auto``: coloured console on a terminal, JSON lines otherwise."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level of log events written (workers and the producer CLI)."""

    hf_token: SecretStr | None = None
    """Hugging Face token (read from ``HF_TOKEN``) for gated or private repositories."""

    profile: str | None = None
    """The profile a worker serves (``GENQ_PROFILE``); ``genq-worker start --profile`` sets it."""

    mode: Literal["auto", "nf4", "fp32"] = "auto"
    """The mode a worker loads in (``GENQ_MODE``)."""

    threads: int | None = Field(None, ge=1)
    """torch intra-op threads per worker process.  Default: CPU cores ÷ processes."""

    live_span_attention: bool = True
    """Decode attention reads each row's keys up to its own length only (runs of rows of similar
    length per call: :mod:`worker.engine.attention`); off: every row up to the longest row's."""

    own_pass: bool = True
    """Llama-family models (Llama, Qwen2, Mistral) on the CPU in fp32 run the engine's own forward
    pass over the slot cache (:mod:`worker.engine.llama`: the same numbers in fewer operations,
    without transformers' per-layer wrappers); off: transformers' pass."""

    fused_linear: bool = True
    """On the CPU in fp32, sibling linear layers that read the same input (query/key/value, gate/up)
    share one prepacked weight and one product (:class:`worker.engine.cpu.FusedLinear`); the same
    numbers, fewer and wider products.  Off: one product per layer."""

    metrics_port: int | None = Field(None, ge=1, le=65535)
    """``genq-worker start`` serves Prometheus metrics on ``http://0.0.0.0:PORT/metrics``
    (``--metrics-port`` overrides it).  Unset: no metrics server.  Needs ``--concurrency 1``."""

    # --- test-only fault injection -----------------------------------------------------------
    # These exist so the fault tests can exercise real worker processes.  They are read from the
    # worker's own environment only: no job message, profile or producer can switch them on.
    fault_poison_marker: str | None = None
    """TEST ONLY: a worker process that is handed an item whose prompt contains this marker kills
    itself with SIGKILL (a poison item)."""

    fault_oom_above: int | None = Field(None, ge=1)
    """TEST ONLY: micro-batches larger than this raise an injected out-of-memory error."""

    fault_slow_ms: int = Field(0, ge=0)
    """TEST ONLY: sleep this long after each micro-batch, to make a chunk last long enough to
    kill or stop a worker in the middle of it."""

    fault_no_lease_renewal: bool = False
    """TEST ONLY: never renew chunk leases (what a worker did before leases), so that a chunk
    outliving the lease is put back on its queue while its first worker still runs it."""

    @property
    def lease(self) -> float:
        """Seconds a chunk's lease lasts without renewal: ``lease_seconds``, or the visibility
        timeout when that is lower (kombu's own sweep would put the chunk back then)."""
        return float(min(self.lease_seconds, self.visibility_timeout))

    fault_follow_kill_at: str | None = Field(None, pattern=r"^[1-9][0-9]*:(read|written)$")
    """TEST ONLY: ``N:read`` makes a `genq collect --follow` process kill itself with SIGKILL
    once it has read its Nth page of results, before writing it; ``N:written`` right after
    writing that page's spool segment, before its results leave Redis."""

    @property
    def offload_dir(self) -> Path:
        return self.offload_folder or self.home / "offload"

    @property
    def broker(self) -> str | None:
        return self.broker_url.get_secret_value() if self.broker_url else None

    @property
    def broker_display(self) -> str | None:
        """The broker URL with any password replaced, safe for logs and status output."""
        return redact_url(self.broker) if self.broker else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            var = "HF_TOKEN" if name == "hf_token" else ENV_PREFIX + name.upper()
            raw = env.get(var)
            if raw is not None and raw != "":
                values[name] = raw.upper() if name == "log_level" else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            var = "HF_TOKEN" if field == "hf_token" else ENV_PREFIX + field.upper()
            shown = "<hidden>" if field in ("broker_url", "hf_token") else repr(values.get(field))
            raise ConfigError(f"{var}={shown}: {err['msg']}") from None


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` → ``redis://user:***@host:6379/0``.

    Split by hand, not with ``urlsplit``: a password holding an unencoded ``#``, ``?`` or ``/``
    would make ``urlsplit`` see no password at all (and a non-numeric port makes it raise), and a
    URL that cannot be parsed is exactly the one that ends up in an error message."""
    scheme, sep, rest = url.partition("://")
    if "password=" in rest:  # a Unix socket's URL may carry it as a query parameter
        head, _, query = rest.partition("?")
        pairs = [p if not p.startswith("password=") else "password=***" for p in query.split("&")]
        rest = f"{head}?{'&'.join(pairs)}" if query else head
        url = f"{scheme}{sep}{rest}"
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    # a lone ``redis://secret@host`` is usually a password written without its colon: hide it
    user = userinfo.partition(":")[0] if ":" in userinfo else ""
    if any(c in user for c in "/?#"):
        user = ""  # the split fell inside the password: show nothing of it
    return f"{scheme}://{user}:***@{host}"


URL_ENCODING_HINT = "percent-encode any '#', '?', '/' or '@' in the password (%23, %3F, %2F, %40)"
"""What to do about a broker URL that cannot be parsed (said instead of the parser's own message,
which may quote part of the password)."""


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def reset_settings() -> None:
    """Forget the cached settings (tests, and the CLI after it sets variables from flags)."""
    global _settings
    _settings = None
