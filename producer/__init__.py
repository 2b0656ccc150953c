"""genq's producer side: everything a submitting machine needs (never imports torch).

``from producer import Client`` loads the client on first use, so that ``genq run`` without a
broker (an embedded run) never imports Redis' job store or Celery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.client import Client, Job

__all__ = ["Client", "Job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from producer import client

        return getattr(client, name)
    raise AttributeError(name)
