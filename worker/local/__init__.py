"""Embedded runs: ``genq run`` without a broker — one process, the same chunk runner, no Redis,
no Celery (:func:`run_embedded`)."""

from worker.local.run import EmbeddedReport, run_embedded

__all__ = ["EmbeddedReport", "run_embedded"]
