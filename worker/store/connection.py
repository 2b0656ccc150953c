"""Connecting to Redis: a client that rides out restarts, and errors that name what to check.

Two kinds of client:

* :func:`connect` retries a lost connection with backoff for about a minute, so a worker or a
  long submit survives a Redis restart;
* :func:`check_reachable` answers in a few seconds whether Redis is there at all, so that every
  ``genq`` command and a starting worker say so at once instead of after the retries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    OutOfMemoryError,
    TimeoutError,
)
from redis.retry import Retry

from worker.core.errors import ConfigError, CredentialsRefused, StoreFull, StoreUnavailable
from worker.core.settings import URL_ENCODING_HINT, redact_url

T = TypeVar("T")

QUICK_TIMEOUT = 2.0
"""Seconds :func:`check_reachable` waits for a connection (and again for the reply)."""


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


SOCKET_SCHEMES = ("unix", "redis+socket", "socket")
"""A Redis on a Unix socket, as redis-py writes it (``unix:///run/redis.sock?db=0``) or as kombu
and Celery do (``redis+socket:///run/redis.sock?virtual_host=0``): genq takes either."""


def _socket_parts(url: str) -> tuple[str, str, str] | None:
    """``(path, db, userinfo)`` of a Unix-socket URL; None for any other URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SOCKET_SCHEMES:
        return None
    userinfo, at, where = rest.rpartition("@")
    if not at:
        userinfo, where = "", rest
    path, _, query = where.partition("?")
    db = "0"
    kept = []
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name in ("db", "virtual_host"):
            db = value or "0"
        elif name == "password" and not userinfo:
            userinfo = f":{value}"
        else:
            kept.append(pair)
    if kept:
        raise ConfigError(
            f"GENQ_BROKER_URL={redact_url(url)}: a Unix socket URL takes only db (or virtual_host)"
        )
    return path, db, userinfo


def _socket_url(url: str, scheme: str, db_name: str) -> str:
    """``url`` as ``scheme://[userinfo@]PATH?<db_name>=N`` when it names a Unix socket."""
    parts = _socket_parts(url)
    if parts is None:
        return url
    path, db, userinfo = parts
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{path}?{db_name}={db}"


def store_url(url: str) -> str:
    """The URL redis-py connects with (a Unix socket as ``unix://PATH?db=N``)."""
    return _socket_url(url, "unix", "db")


def broker_url(url: str) -> str:
    """The URL Celery's broker connects with (a Unix socket as kombu's ``redis+socket://``)."""
    return _socket_url(url, "redis+socket", "virtual_host")


def _from_url(url: str, **options: Any) -> redis.Redis:
    if _socket_parts(url) is not None:  # TCP's options mean nothing on a Unix socket
        options.pop("socket_keepalive", None)
        url = store_url(url)
    try:
        return redis.Redis.from_url(url, decode_responses=True, **options)
    except ValueError:  # redis-py's message may quote part of the password: never append it
        raise ConfigError(
            f"GENQ_BROKER_URL={redact_url(url)} cannot be parsed; {URL_ENCODING_HINT}"
        ) from None


def connect(url: str, *, retry_seconds: float = 60.0) -> redis.Redis:
    """A Redis client that rides out restarts: retries with backoff for about ``retry_seconds``."""
    return _from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        socket_keepalive=True,
        health_check_interval=15,
        retry=_Retry(ExponentialBackoff(cap=1.0, base=0.05), max(1, int(retry_seconds)) + 5),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
    )


def unreachable(shown: str, exc: BaseException) -> StoreUnavailable:
    reason = str(exc).split("\n")[0][:160] or type(exc).__name__
    return StoreUnavailable(
        f"cannot reach Redis at {shown} ({reason}): check that redis-server runs there, that this "
        "machine can reach it, and that GENQ_BROKER_URL names it"
    )


def refused(shown: str, exc: BaseException) -> CredentialsRefused:
    # Redis's own message ("invalid username-password pair…") never contains the password
    return CredentialsRefused(f"Redis at {shown} refused the credentials in GENQ_BROKER_URL: {exc}")


def full(shown: str, exc: BaseException) -> StoreFull:
    return StoreFull(
        f"Redis at {shown} is out of memory (it reached its maxmemory: {exc}); raise `maxmemory` "
        "(redis-cli CONFIG SET maxmemory ...), or free space with `genq prune` / `genq delete JOB`"
    )


def check_reachable(url: str) -> None:
    """Return when Redis at ``url`` answers a PING; within a few seconds raise
    :class:`StoreUnavailable` when it cannot be reached, :class:`CredentialsRefused` when it
    refuses the credentials (:class:`ConfigError` when the URL cannot be parsed)."""
    shown = redact_url(url)
    client = _from_url(url, socket_connect_timeout=QUICK_TIMEOUT, socket_timeout=QUICK_TIMEOUT)
    try:
        client.ping()
    except (AuthenticationError, AuthorizationError) as exc:
        raise refused(shown, exc) from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise unreachable(shown, exc) from None
    except redis.ResponseError as exc:  # e.g. NOAUTH: a password is needed and none was given
        raise refused(shown, exc) from None
    finally:
        client.close()


def guarded(shown: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``, turning Redis' connection, credential and memory errors into genq errors."""
    try:
        return fn(*args, **kwargs)
    except (AuthenticationError, AuthorizationError) as exc:
        raise refused(shown, exc) from None
    except OutOfMemoryError as exc:
        raise full(shown, exc) from None
    except (ConnectionError, TimeoutError) as exc:
        raise unreachable(shown, exc) from None


def guarded_iter(shown: str, it: Iterator[T]) -> Iterator[T]:
    """:func:`guarded` for each step of an iterator (a SCAN, say)."""
    while True:
        try:
            value = guarded(shown, next, it)
        except StopIteration:
            return
        yield value
