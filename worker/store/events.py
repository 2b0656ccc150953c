"""Waiting for a job's end without polling it fast: its final status is published once, on the
job's events channel, by the Lua script that ends the job."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis


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
