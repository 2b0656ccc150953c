"""TEST ONLY: fault injection for the fault tests, which exercise real worker processes.

:func:`worker.engine.build_engine` returns a :class:`FaultyEngine` instead of a plain
:class:`~worker.engine.scheduler.Engine` only when one of the ``GENQ_FAULT_*`` settings is set in
the worker's own environment (no job, profile or producer can set them):

* ``GENQ_FAULT_POISON_MARKER``: an item whose prompt contains the marker kills the process with
  SIGKILL when it is prepared (a poison item);
* ``GENQ_FAULT_OOM_ABOVE``: a micro-batch of more rows raises an injected out-of-memory error;
* ``GENQ_FAULT_SLOW_MS``: each micro-batch sleeps this long after it finishes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from worker.core.errors import OutOfMemory
from worker.core.schema import GenParams, Item
from worker.core.settings import Settings
from worker.engine.prompts import Prepared
from worker.engine.scheduler import Engine, ResultCallback


def faults_enabled(settings: Settings) -> bool:
    return bool(
        settings.fault_poison_marker or settings.fault_oom_above is not None or settings.fault_slow_ms
    )


class FaultyEngine(Engine):
    """An :class:`Engine` that misbehaves as its settings say (see the module's notes)."""

    def prepare(
        self, item: Item, job_params: GenParams | None = None, system_prompt: str | None = None
    ) -> Prepared:
        marker = self.settings.fault_poison_marker
        if marker and marker in (item.prompt or "") + "".join(m.content for m in item.messages or []):
            self.log.warning("fault_poison_item", item=item.id)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().prepare(item, job_params, system_prompt)

    def run_batch(
        self,
        batch: list[Prepared],
        rows: int,
        attempts: int,
        emit: ResultCallback,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        limit = self.settings.fault_oom_above
        if limit is not None and rows > limit:
            raise OutOfMemory(f"injected: micro-batch of {rows} rows > {limit}")
        super().run_batch(batch, rows, attempts, emit, should_stop)
        if self.settings.fault_slow_ms:
            time.sleep(self.settings.fault_slow_ms / 1000)
