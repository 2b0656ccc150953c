"""The Celery consumer genq's workers run: Celery's own, patient and quiet while Redis is full.

At ``maxmemory`` Redis refuses kombu's writes (a delivery writes the unacked hash), and Celery's
consumer restarts at once, about six times a second, logging "Cannot connect to redis" and
"Frequent restarts detected" each time.  Here such an error is reported through the worker's
:func:`~worker.store.memory.full_notice` (one line a minute, naming maxmemory, used and max memory
and what to do), and the consumer waits before it restarts, longer each time up to
:data:`MAX_WAIT` seconds.  Any other connection error goes the way Celery handles it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.state import maybe_shutdown

from worker.core.logs import get_logger
from worker.core.settings import redact_url
from worker.queue.app import quiet_celery
from worker.store.memory import full_notice, is_full

FIRST_WAIT = 1.0
MAX_WAIT = 8.0
"""Seconds the consumer waits before reconnecting to a full Redis: doubling from FIRST_WAIT."""
CELERY_CONSUMER_LOGGER = "celery.worker.consumer.consumer"


class _DropFull(logging.Filter):
    """Celery's own lines about a full Redis: the notice says it once a minute instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(a, BaseException) and is_full(a) for a in args):
            return False
        return "maxmemory" not in record.getMessage()


class Consumer(CeleryConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        quiet_celery()  # again: Celery's logging setup put its own warning filters first
        full_notice().owner = os.getpid()
        logging.getLogger(CELERY_CONSUMER_LOGGER).addFilter(_DropFull())
        self._full_wait = FIRST_WAIT
        self._full_since = 0.0
        self._info_client: Any = None

    def on_connection_error_before_connected(self, exc: BaseException) -> None:
        if not is_full(exc):
            super().on_connection_error_before_connected(exc)
            return
        self._back_off(exc)

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        super().on_connection_error_after_connected(exc)
        if is_full(exc):
            self._back_off(exc)

    def _back_off(self, exc: BaseException) -> None:
        """Report (rate limited) and wait before the next reconnect, checking for shutdown."""
        now = time.monotonic()
        if now - self._full_since > 2 * MAX_WAIT:  # a new episode: start short again
            self._full_wait = FIRST_WAIT
        url = str(self.app.conf.broker_url or "")
        if self._info_client is None:  # INFO only: Redis answers reads when full
            import redis

            self._info_client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        full_notice().report(self._info_client, redact_url(url), get_logger(worker=self.hostname), exc)
        deadline = now + self._full_wait
        while time.monotonic() < deadline:
            maybe_shutdown()
            time.sleep(0.2)
        self._full_wait = min(MAX_WAIT, 2 * self._full_wait)
        self._full_since = time.monotonic()
