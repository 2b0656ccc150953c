"""When a dead worker's chunk comes back: the visibility timeout and kombu's restore sweep.

kombu's Redis transport keeps delivered, unacknowledged messages in ``unacked`` and sweeps those
older than the visibility timeout back to their queue, but only every
``unacked_restore_interval × unacked_restore_throttle`` seconds (10 × 10 = 100 s by default,
whatever the timeout).  Both are derived here from the visibility timeout, so that a SIGKILLed
worker's chunk is back within about 1.25 × the timeout.
"""

from __future__ import annotations

from typing import Any

from worker.core.settings import Settings


def restore_timing(visibility_timeout: int) -> tuple[float, int]:
    """kombu's unacked-restore sweep ``(interval, throttle)``: a throttle of 1 and an interval of a
    quarter of the timeout (1 s to 60 s)."""
    return float(min(60, max(1, visibility_timeout // 4))), 1


def transport_options(settings: Settings) -> dict[str, Any]:
    interval, throttle = restore_timing(settings.visibility_timeout)
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": interval,
        "unacked_restore_throttle": throttle,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 15,
        "retry_on_timeout": True,
    }
