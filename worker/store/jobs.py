"""The Redis job store: job records, inputs, per-item results, attempts, workers.

Keys (all under ``genq:``):

=============================  ============================================================
``job:<id>``                   hash: ``spec`` (JSON), ``status``, counts, token totals, times
``job:<id>:inputs``            hash: item index → Item JSON (stored once, at submit)
``job:<id>:results``           hash: item index → ItemResult JSON (first write wins)
``job:<id>:chunks``            hash: chunk id → JSON ``{"indices": [...], "split": bool}``
``job:<id>:attempts``          hash: chunk id → deliveries started
``job:<id>:running``           hash: chunk id → ``worker|since`` while a worker works on it
``job:<id>:workers``           hash: ``<worker>:items`` / ``<worker>:tokens`` per worker
``jobs``                       sorted set: job id by creation time (the job index)
``worker:<name>``              string: heartbeat JSON, with a TTL
``workers``                    sorted set: worker name by last heartbeat
``job:<id>:events``            pub/sub channel (not a key): the final status, once, when it is set
=============================  ============================================================

Results and counts move together in one Lua script, so counts are exact even when a chunk is
delivered twice or Redis restarts between a write and its reply.  When every item is accounted
for, the same script sets the final status and the retention TTL on all of the job's keys, and
publishes the status on the job's events channel, so that producers waiting for the job
(:class:`JobEvents`) learn at once instead of at their next poll.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    TimeoutError,
)
from redis.retry import Retry

from worker.core.errors import JobConflict, JobNotFound, StoreUnavailable
from worker.core.schema import Counts, ErrorInfo, Item, ItemResult, JobSpec, error_result
from worker.core.settings import URL_ENCODING_HINT, Settings, get_settings, redact_url
from worker.core.states import FINAL_STATUSES

PREFIX = "genq:"


def _lua(name: str) -> str:
    return (Path(__file__).parent / "lua" / f"{name}.lua").read_text()


COUNT_FIELDS = ("succeeded", "errored", "cancelled", "expired")
PAGE = 1000

_RECORD = _lua("record")

_START = _lua("start")

_UNRECORD = _lua("unrecord")


def result_kind(result: ItemResult) -> str:
    """Which count a result moves: succeeded, errored, cancelled or expired."""
    if result.ok:
        return "succeeded"
    if result.error_type in ("cancelled", "expired"):
        return str(result.error_type)
    return "errored"


@dataclass
class JobState:
    """A snapshot of a job: what `genq status` shows."""

    spec: JobSpec
    status: str
    counts: Counts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    workers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return max((self.finished_at or time.time()) - self.started_at, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.elapsed if self.started_at else 0.0

    @property
    def items_per_second(self) -> float:
        return self.counts.finished / self.elapsed if self.started_at else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.items_per_second
        if self.final or rate <= 0:
            return None
        return self.counts.pending / rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.spec.job_id,
            "status": self.status,
            "profile": self.spec.profile,
            "mode": self.spec.mode,
            "counts": self.counts.as_dict(),
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "tokens_per_second": round(self.tokens_per_second, 2),
            "items_per_second": round(self.items_per_second, 3),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "created_at": self.spec.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "expires_at": self.spec.expires_at,
            "workers": self.workers,
        }


class _Retry(Retry):
    """Retries lost connections, never refused credentials: redis-py's AuthenticationError is a
    ConnectionError, and retrying a wrong password only turns a clear error into a minute's hang."""

    def call_with_retry(
        self,
        do: Any,
        fail: Any,
        is_retryable: Any = None,
        with_failure_count: bool = False,
    ) -> Any:
        def retryable(exc: Exception) -> bool:
            if isinstance(exc, AuthenticationError | AuthorizationError):
                return False
            return is_retryable is None or bool(is_retryable(exc))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(url: str, *, retry_seconds: float = 60.0) -> redis.Redis:
    """A Redis client that rides out restarts: retries with backoff for about ``retry_seconds``."""
    retries = max(1, int(retry_seconds / 1.0)) + 5
    try:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=30,
            socket_keepalive=True,
            health_check_interval=15,
            retry=_Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
        )
    except ValueError:  # redis-py's message may quote part of the password: never append it
        shown = redact_url(url)
        raise StoreUnavailable(f"bad Redis URL {shown}: cannot parse it; {URL_ENCODING_HINT}") from None


class JobEvents:
    """Waiting for a job to end without polling it fast.  :meth:`pause` sleeps up to ``seconds``
    but returns as soon as the job's final status is published; subscribe (enter the context)
    before the first status read, so that an end between the read and the pause is not missed.
    A lost connection (a Redis restart) only turns a pause back into a plain sleep."""

    def __init__(self, r: redis.Redis, channel: str) -> None:
        self.r = r
        self.channel = channel
        self.pubsub: Any = None

    def __enter__(self) -> JobEvents:
        self._subscribe()
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop()

    def _subscribe(self) -> None:
        try:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.channel)
            self.pubsub = pubsub
        except (redis.RedisError, OSError):
            self.pubsub = None

    def _drop(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                self.pubsub.close()
        self.pubsub = None

    def pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the job's end was published meanwhile."""
        deadline = time.monotonic() + seconds
        if self.pubsub is None:
            self._subscribe()
        while (left := deadline - time.monotonic()) > 0:
            if self.pubsub is None:
                time.sleep(left)
                return False
            try:
                message = self.pubsub.get_message(timeout=left)
            except (redis.RedisError, OSError):
                self._drop()  # resubscribed at the next pause
                continue
            if message is not None and message.get("type") == "message":
                return True
        return False


class RedisStore:
    """The job store.  Every method is safe to call again after a failure (idempotent)."""

    def __init__(
        self, url: str | None = None, *, settings: Settings | None = None, client: Any = None
    ) -> None:
        self.settings = settings or get_settings()
        url = url or self.settings.broker
        if client is None and not url:
            raise StoreUnavailable("GENQ_BROKER_URL is not set: no job store to talk to")
        self.url_display = redact_url(url) if url else "<client>"
        self.r: redis.Redis = client if client is not None else connect(url or "")
        self._record = self.r.register_script(_RECORD)
        self._unrecord = self.r.register_script(_UNRECORD)
        self._start = self.r.register_script(_START)
        self._specs: dict[str, JobSpec] = {}

    # --- keys ----------------------------------------------------------------------------------

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")

    def job_keys(self, job_id: str) -> list[str]:
        return [self.key(job_id)] + [
            self.key(job_id, p) for p in ("inputs", "results", "chunks", "attempts", "running", "workers")
        ]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (AuthenticationError, AuthorizationError) as exc:
            # Redis's own message ("invalid username-password pair…") never contains the password
            raise StoreUnavailable(
                f"Redis at {self.url_display} refused the credentials in GENQ_BROKER_URL: {exc}"
            ) from None
        except (ConnectionError, TimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis at {self.url_display} is unreachable: {type(exc).__name__}"
            ) from None

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))

    # --- jobs ----------------------------------------------------------------------------------

    def job_exists(self, job_id: str) -> bool:
        return bool(self._call(self.r.exists, self.key(job_id)))

    def create_job(self, spec: JobSpec, items: Sequence[Item], chunks: dict[str, list[int]]) -> bool:
        """Store a new job.  Returns False (and changes nothing) when the job id exists with the
        same inputs — the caller then resumes it; raises JobConflict when the inputs differ."""
        if self.job_exists(spec.job_id):
            existing = self.spec(spec.job_id)
            if existing.input_digest != spec.input_digest or existing.profile != spec.profile:
                raise JobConflict(
                    f"job {spec.job_id} exists with different inputs or profile; choose another --job-id"
                )
            return False
        for start in range(0, len(items), PAGE):
            page = items[start : start + PAGE]
            self._call(
                self.r.hset,
                self.key(spec.job_id, "inputs"),
                mapping={str(i.index): i.model_dump_json() for i in page},
            )
        chunk_rows = {cid: json.dumps({"indices": idx}) for cid, idx in chunks.items()}
        for start in range(0, len(chunk_rows), PAGE):
            page_ids = list(chunk_rows)[start : start + PAGE]
            self._call(
                self.r.hset, self.key(spec.job_id, "chunks"), mapping={c: chunk_rows[c] for c in page_ids}
            )
        pipe = self.r.pipeline(transaction=True)
        # the job hash is written last: a job exists only once its inputs are complete
        pipe.hset(
            self.key(spec.job_id),
            mapping={
                "spec": spec.model_dump_json(),
                "status": "queued",
                "total": spec.total,
                **dict.fromkeys(COUNT_FIELDS, 0),
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "updated_at": time.time(),
            },
        )
        pipe.zadd(f"{PREFIX}jobs", {spec.job_id: spec.created_at})
        self._call(pipe.execute)
        return True

    def spec(self, job_id: str) -> JobSpec:
        cached = self._specs.get(job_id)
        if cached is not None:
            return cached
        raw = self._call(self.r.hget, self.key(job_id), "spec")
        if raw is None:
            raise JobNotFound(
                f"no job {job_id!r} in {self.url_display} "
                f"(finished jobs are kept {self.settings.result_ttl} s)"
            )
        spec = JobSpec.model_validate_json(raw)
        self._specs[job_id] = spec
        return spec

    def state(self, job_id: str) -> JobState:
        raw: dict[str, str] = self._call(self.r.hgetall, self.key(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} in {self.url_display}")
        spec = JobSpec.model_validate_json(raw["spec"])
        counts = Counts(
            total=int(raw.get("total", spec.total)), **{k: int(raw.get(k, 0)) for k in COUNT_FIELDS}
        )
        per_worker: dict[str, dict[str, int]] = {}
        for name, value in self._call(self.r.hgetall, self.key(job_id, "workers")).items():
            worker, _, what = name.rpartition(":")
            per_worker.setdefault(worker, {})[what] = int(value)

        def opt(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return JobState(
            spec=spec,
            status=raw.get("status", "queued"),
            counts=counts,
            prompt_tokens=int(raw.get("prompt_tokens", 0)),
            completion_tokens=int(raw.get("completion_tokens", 0)),
            started_at=opt("started_at"),
            finished_at=opt("finished_at"),
            updated_at=opt("updated_at"),
            workers=per_worker,
        )

    def events(self, job_id: str) -> JobEvents:
        """Wake-ups for the end of ``job_id``: ``with store.events(job) as ev: ... ev.pause(1.0)``."""
        return JobEvents(self.r, self.key(job_id, "events"))

    def status(self, job_id: str) -> str:
        return str(self._call(self.r.hget, self.key(job_id), "status") or "")

    def list_jobs(self, limit: int = 20) -> list[JobState]:
        ids = self._call(self.r.zrevrange, f"{PREFIX}jobs", 0, max(limit * 2, limit) - 1)
        states: list[JobState] = []
        for job_id in ids:
            try:
                states.append(self.state(job_id))
            except JobNotFound:  # expired after retention: drop it from the index
                self._call(self.r.zrem, f"{PREFIX}jobs", job_id)
            if len(states) >= limit:
                break
        return states

    # --- items and results ---------------------------------------------------------------------

    def items(self, job_id: str, indices: Sequence[int]) -> list[Item]:
        raw = self._call(self.r.hmget, self.key(job_id, "inputs"), [str(i) for i in indices])
        missing = [i for i, r in zip(indices, raw, strict=True) if r is None]
        if missing:
            raise JobNotFound(f"job {job_id}: inputs {missing[:5]} are missing (expired or deleted)")
        return [Item.model_validate_json(r) for r in raw]

    def done(self, job_id: str, indices: Sequence[int]) -> set[int]:
        """Which of ``indices`` already have a result."""
        pipe = self.r.pipeline(transaction=False)
        for i in indices:
            pipe.hexists(self.key(job_id, "results"), str(i))
        flags = self._call(pipe.execute)
        return {i for i, f in zip(indices, flags, strict=True) if f}

    def record(self, job_id: str, results: Sequence[ItemResult], worker: str | None = None) -> int:
        """Write results, first write wins; returns how many were new."""
        if not results:
            return 0
        argv: list[Any] = [time.time(), self.settings.result_ttl, worker or "", len(results)]
        for r in results:
            argv += [
                r.index,
                r.model_dump_json(),
                result_kind(r),
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
            ]
        keys = [
            self.key(job_id),
            self.key(job_id, "results"),
            self.key(job_id, "workers"),
            *self.job_keys(job_id),
        ]
        written = int(self._call(self._record, keys=keys, args=argv))
        if written < 0:
            raise JobNotFound(f"job {job_id} disappeared while its results were being written")
        return written

    def results(self, job_id: str, total: int | None = None) -> Iterator[tuple[int, ItemResult | None]]:
        """``(index, result or None)`` for every item, in input order, a page at a time."""
        total = self.spec(job_id).total if total is None else total
        for start in range(0, total, PAGE):
            idx = list(range(start, min(start + PAGE, total)))
            raw = self._call(self.r.hmget, self.key(job_id, "results"), [str(i) for i in idx])
            for i, r in zip(idx, raw, strict=True):
                yield i, (ItemResult.model_validate_json(r) if r is not None else None)

    def all_items(self, job_id: str, total: int) -> Iterator[Item]:
        for start in range(0, total, PAGE):
            yield from self.items(job_id, list(range(start, min(start + PAGE, total))))

    def pending_indices(self, job_id: str, indices: Sequence[int]) -> list[int]:
        done = self.done(job_id, indices)
        return [i for i in indices if i not in done]

    # --- chunks ----------------------------------------------------------------------------------

    def chunks(self, job_id: str) -> dict[str, dict[str, Any]]:
        raw = self._call(self.r.hgetall, self.key(job_id, "chunks"))
        return {cid: json.loads(v) for cid, v in raw.items()}

    def add_chunks(
        self, job_id: str, chunks: dict[str, list[int]], *, split_parent: str | None = None
    ) -> None:
        pipe = self.r.pipeline(transaction=True)
        for cid, idx in chunks.items():
            pipe.hset(self.key(job_id, "chunks"), cid, json.dumps({"indices": idx}))
        if split_parent is not None:
            pipe.hset(self.key(job_id, "chunks"), split_parent, json.dumps({"indices": [], "split": True}))
        self._call(pipe.execute)

    def start_attempt(self, job_id: str, chunk_id: str) -> int:
        return int(self._call(self.r.hincrby, self.key(job_id, "attempts"), chunk_id, 1))

    def undo_attempt(self, job_id: str, chunk_id: str) -> None:
        """A chunk handed back on shutdown did not fail: do not count that delivery."""
        self._call(self.r.hincrby, self.key(job_id, "attempts"), chunk_id, -1)

    def mark_running(self, job_id: str, chunk_id: str, worker: str) -> None:
        """Note who works on a chunk; the first chunk to start moves the job to in_progress and
        starts its clock (so tokens/s counts from the first chunk, not the first result)."""
        now = time.time()
        self._call(
            self._start,
            keys=[self.key(job_id), self.key(job_id, "running")],
            args=[chunk_id, f"{worker}|{now}", now],
        )

    def clear_running(self, job_id: str, chunk_id: str) -> None:
        self._call(self.r.hdel, self.key(job_id, "running"), chunk_id)

    def running(self, job_id: str) -> dict[str, tuple[str, float]]:
        out: dict[str, tuple[str, float]] = {}
        for cid, value in self._call(self.r.hgetall, self.key(job_id, "running")).items():
            worker, _, since = value.rpartition("|")
            out[cid] = (worker, float(since or 0))
        return out

    # --- cancel, expire, retry -------------------------------------------------------------------

    def close_items(self, job_id: str, indices: Iterable[int], kind: str, message: str) -> int:
        """Record ``cancelled`` or ``expired`` for those of ``indices`` not yet done."""
        idx = list(indices)
        if not idx:
            return 0
        todo = self.pending_indices(job_id, idx)
        written = 0
        for start in range(0, len(todo), PAGE):
            items = self.items(job_id, todo[start : start + PAGE])
            written += self.record(
                job_id, [error_result(it, ErrorInfo(type=kind, message=message)) for it in items]
            )
        return written

    def request_cancel(self, job_id: str) -> JobState:
        """Mark the job cancelling and close every pending item not in a chunk a live worker is
        running; those workers close the rest between micro-batches."""
        state = self.state(job_id)
        if state.final:
            return state
        self._call(self.r.hset, self.key(job_id), "status", "cancelling")
        busy = self._live_running(job_id)
        idle = [i for cid, c in self.chunks(job_id).items() if cid not in busy for i in c["indices"]]
        self.close_items(job_id, idle, "cancelled", "the job was cancelled before this item ran")
        return self.state(job_id)

    def expire_if_due(self, job_id: str, now: float | None = None) -> bool:
        """Past ``expires_at``: close pending items not being run as ``expired``."""
        spec = self.spec(job_id)
        if spec.expires_at is None or (now or time.time()) < spec.expires_at:
            return False
        if self.status(job_id) in FINAL_STATUSES:
            return False
        busy = self._live_running(job_id)
        idle = [i for cid, c in self.chunks(job_id).items() if cid not in busy for i in c["indices"]]
        self.close_items(job_id, idle, "expired", "the job expired before this item ran")
        return True

    def _live_running(self, job_id: str) -> set[str]:
        horizon = time.time() - self.settings.visibility_timeout
        return {cid for cid, (_, since) in self.running(job_id).items() if since >= horizon}

    def errored_indices(self, job_id: str) -> list[int]:
        out: list[int] = []
        for index, result in self.results(job_id):
            if result is not None and not result.ok:
                out.append(index)
        return out

    def forget(self, job_id: str, indices: Sequence[int]) -> int:
        """Drop the error results of ``indices`` (for `genq retry`); returns how many."""
        if not indices:
            return 0
        keys = [self.key(job_id), self.key(job_id, "results"), *self.job_keys(job_id)]
        removed = 0
        for start in range(0, len(indices), PAGE):
            removed += int(
                self._call(self._unrecord, keys=keys, args=[str(i) for i in indices[start : start + PAGE]])
            )
        return removed

    def message_ids(self, queues: Sequence[str]) -> set[str]:
        """Task ids of the messages waiting in ``queues`` or delivered but not yet acknowledged
        (kombu's Redis layout), so a resumed job re-enqueues only chunks whose message is gone."""
        ids: set[str] = set()

        def take(raw: str, wrapped: bool) -> None:
            try:
                body = json.loads(raw)
                msg = body[0] if wrapped else body
                ids.add(str(msg["headers"]["id"]))
            except (ValueError, KeyError, IndexError, TypeError):
                pass

        for queue in queues:
            length = int(self._call(self.r.llen, queue))
            for start in range(0, length, PAGE):
                for raw in self._call(self.r.lrange, queue, start, start + PAGE - 1):
                    take(raw, wrapped=False)
        for _, raw in self._call(self.r.hscan_iter, "unacked"):
            take(raw, wrapped=True)
        return ids

    # --- workers ---------------------------------------------------------------------------------

    def heartbeat(self, name: str, info: dict[str, Any], ttl: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(f"{PREFIX}worker:{name}", json.dumps(info), ex=max(1, int(ttl)))
        pipe.zadd(f"{PREFIX}workers", {name: time.time()})
        self._call(pipe.execute)

    def remove_worker(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(f"{PREFIX}worker:{name}")
        pipe.zrem(f"{PREFIX}workers", name)
        self._call(pipe.execute)

    def workers(self) -> list[dict[str, Any]]:
        names = self._call(self.r.zrange, f"{PREFIX}workers", 0, -1)
        if not names:
            return []
        raw = self._call(self.r.mget, [f"{PREFIX}worker:{n}" for n in names])
        live = []
        for name, value in zip(names, raw, strict=True):
            if value is None:
                self._call(self.r.zrem, f"{PREFIX}workers", name)
            else:
                live.append(json.loads(value))
        return live
