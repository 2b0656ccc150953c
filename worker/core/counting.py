"""The one counting rule: which job counter a result moves, and which results ``genq retry`` runs
again (the errors worth a retry are decided by the error classes: :func:`retry_may_help`).

The Lua scripts of the job store never decide this themselves: Python computes the counter with
:func:`count_field` and passes it along, so Redis, the in-memory store of embedded runs and the
progress display always agree.
"""

from __future__ import annotations

from worker.core.errors import retry_may_help
from worker.core.schema import ItemResult
from worker.core.states import CountField, ErrorCode

NOT_RUN_CODES: frozenset[str] = frozenset({ErrorCode.CANCELLED, ErrorCode.EXPIRED})
"""Errors that mean "never ran": they count as cancelled or expired, not as errored."""


def count_field(result: ItemResult) -> CountField:
    """The counter ``result`` moves: succeeded, errored, cancelled or expired."""
    if result.ok:
        return CountField.SUCCEEDED
    if result.error_type == ErrorCode.CANCELLED:
        return CountField.CANCELLED
    if result.error_type == ErrorCode.EXPIRED:
        return CountField.EXPIRED
    return CountField.ERRORED


def retryable(result: ItemResult, *, all_errors: bool = False) -> bool:
    """Whether ``genq retry`` runs ``result``'s item again: an error that may pass next time
    (a transient one: ``worker_lost``, ``out_of_memory``, ``generation_error``, ...), any error with
    ``all_errors``; never a success or an item that was never run."""
    if result.ok or result.error_type in NOT_RUN_CODES:
        return False
    return all_errors or retry_may_help(result.error_type or "")
