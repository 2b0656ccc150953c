"""What every part of the store shares: the client, the settings, the Lua scripts, error mapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker.core.errors import JobNotFound, JobRefused, StoreUnavailable
from worker.core.lifecycle import Event, allowed_arg, refusal
from worker.core.schema import JobSpec
from worker.core.settings import Settings, get_settings, redact_url
from worker.store.connection import check_reachable, connect, guarded

LUA = Path(__file__).parent / "lua"
SCRIPTS = (
    "begin",
    "write",
    "complete",
    "claim",
    "append",
    "chunks",
    "finish_submit",
    "start",
    "release",
    "record",
    "settle",
    "end",
    "unrecord",
    "delete",
    "dispatch",
    "rescue",
    "renew",
    "waste",
    "drain",
)
"""The Lua scripts in ``lua/``, each one atomic step of a job's life (read once, at import)."""

GUARD = (LUA / "guard.lua").read_text(encoding="utf-8")
"""Put before every script: the state table's guard (status and incarnation in the same step)."""

_SOURCES = {name: GUARD + (LUA / f"{name}.lua").read_text(encoding="utf-8") for name in SCRIPTS}

REFUSED = "GENQ_REFUSED "
"""How a guarded script says no: an error reply naming the status it found (or ``absent``)."""


class StoreBase:
    """A connection to the job store.  A lost connection is retried for about ``retry_seconds``
    (a Redis restart) before :class:`StoreUnavailable`.  ``client`` replaces the connection."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        client: redis.Redis | None = None,
        retry_seconds: float = 60.0,
    ) -> None:
        self.settings = settings or get_settings()
        url = url or self.settings.broker
        if client is None and not url:
            raise StoreUnavailable("GENQ_BROKER_URL is not set: no job store to talk to")
        self.url = url or ""
        self.url_display = redact_url(url) if url else "<client>"
        self.r: redis.Redis = client if client is not None else connect(self.url, retry_seconds=retry_seconds)
        self.scripts = {name: self.r.register_script(src) for name, src in _SOURCES.items()}
        self._specs: dict[tuple[str, str], JobSpec] = {}
        """Specs of complete jobs by (job id, incarnation): a job's spec never changes within an
        incarnation, and a job id submitted again is another incarnation."""

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` with Redis' errors as genq errors.  Replies are ``Any``: the client
        decodes them to ``str`` (redis-py's own types cannot say so)."""
        return guarded(self.url_display, fn, *args, **kwargs)

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(self.scripts[name], keys=keys, args=args)

    def _step(self, event: Event, job_id: str, inc: str, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a guarded script (``inc``, the statuses ``event`` applies from, then ``args``);
        a refusal raises the state table's error (:class:`JobNotFound` when the job is gone or
        another incarnation, else :class:`JobRefused`)."""
        try:
            return self._script(name, keys, [inc, allowed_arg(event), *args])
        except redis.ResponseError as exc:
            raise refused(exc, event, job_id) from None

    def check(self) -> None:
        """Fail within seconds, with what to check, when Redis is not there (every command
        starts with this; the store's own client would retry for a minute)."""
        if self.url:
            check_reachable(self.url)

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))


def refused(exc: redis.ResponseError, event: Event, job_id: str) -> JobRefused | JobNotFound:
    """The state table's error for a guarded script's refusal (any other error is re-raised)."""
    text = str(exc)
    at = text.find(REFUSED)  # a pipeline's error names the command first: "Command # 1 (...) ..."
    if at < 0:
        raise exc
    state = text[at + len(REFUSED) :].split()[0]
    return refusal(event, None if state == "absent" else state, job_id)
