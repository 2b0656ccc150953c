"""One retry rule: the error classes of worker/core/errors.py decide it, and `genq retry` (the store's
``retryable``), the chunk runner and docs/OPERATIONS.md all follow it.

* every class's code, recorded as an item's error in a real Redis job store, is re-enqueued by
  ``retryable`` exactly when the class is transient (``--all-errors``: every one);
* the codes the retry paragraph of docs/OPERATIONS.md names are on the side the classes put them;
* the chunk runner, given an engine failure it cannot cure, records the item with that error's
  own code, and raises a transient one (the task hands the chunk back).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.helpers import REPO, RedisServer, make_job
from worker.chunks import process_chunk
from worker.core.counting import retryable
from worker.core.errors import (
    GenqError,
    InsufficientMemory,
    PermanentError,
    StoreUnavailable,
    TransientError,
    retry_may_help,
)
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, Item, ItemResult, JobSpec, error_result
from worker.core.settings import Settings
from worker.core.states import ChunkOutcome, ErrorCode
from worker.store import RedisStore
from worker.store.keys import job_key


def error_classes() -> list[type[GenqError]]:
    found: list[type[GenqError]] = [GenqError]
    for cls in found:
        found.extend(c for c in cls.__subclasses__() if c not in found)
    return found


def declared_codes() -> dict[str, type[GenqError]]:
    """Each code and the class that declares it (the first in the tree)."""
    out: dict[str, type[GenqError]] = {}
    for cls in error_classes():
        out.setdefault(str(cls.code), cls)
    return out


def transient(cls: type[GenqError]) -> bool:
    return issubclass(cls, TransientError)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    yield RedisStore(redis_server.url, settings=Settings.from_env({}))


def new_job(store: RedisStore, n: int, job: str = "j1") -> list[Item]:
    made = [
        Item(index=i, id=f"p{i:02d}", line=i + 1, prompt=f"p {i}", params=GenParams(max_new_tokens=2))
        for i in range(n)
    ]
    make_job(store, JobSpec(job_id=job, profile="tiny-random", chunk_size=n, total=n), made)
    return made


def test_classes_that_share_a_code_share_a_branch() -> None:
    for cls in error_classes():
        owner = declared_codes()[str(cls.code)]
        assert issubclass(cls, PermanentError) == issubclass(owner, PermanentError), cls


def test_genq_retry_follows_the_error_classes(store: RedisStore) -> None:
    """One errored item per class code in a real job; ``retryable`` (what `genq retry` runs)
    picks exactly the transient ones, and every error with ``all_errors``."""
    codes = declared_codes()
    made = new_job(store, len(codes))
    by_index = dict(enumerate(codes))
    store.record(
        "j1",
        [error_result(made[i], ErrorInfo(type=code, message="x")) for i, code in by_index.items()],
    )
    picked = {by_index[i] for i, _cid, _r in store.retryable("j1")}
    expected = {code for code, cls in codes.items() if not issubclass(cls, PermanentError)}
    assert picked == expected
    # the decision itself, pinned: a worker that died or ran out of memory may pass next time
    assert {"worker_lost", "out_of_memory", "generation_error", "store_full"} <= picked
    assert not {"invalid_input", "context_length_exceeded", "unknown_profile", "config_error"} & picked
    assert {by_index[i] for i, _cid, _r in store.retryable("j1", all_errors=True)} == set(codes)


def test_cancelled_and_expired_are_never_retried_and_unknown_codes_are() -> None:
    item = Item(index=0, id="a", line=1, prompt="p")
    for code, retried in (
        (ErrorCode.CANCELLED, False),
        (ErrorCode.EXPIRED, False),
        ("an_older_genqs_code", True),
    ):
        result = error_result(item, ErrorInfo(type=code, message="x"))
        assert retryable(result) is retried, code
        assert retryable(result, all_errors=True) is retried, code


def test_the_docs_retry_paragraph_is_the_classes_rule() -> None:
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    para = text[text.index("**Retry.**") :]
    para = para[: para.index("\n\n")]
    rerun, _, left = para.partition("Permanent ones")
    rerun = rerun[rerun.index("re-runs") :]
    left = left[: left.index("--all-errors")]
    codes = declared_codes()
    named_rerun = re.findall(r"`([a-z_]+)`", rerun)
    named_left = re.findall(r"`([a-z_]+)`", left)
    assert named_rerun and named_left
    for code in named_rerun:
        assert code in codes and retry_may_help(code), code
    for code in named_left:
        assert code in codes and not retry_may_help(code), code


class _FailingEngine:
    """An engine whose every call fails with ``error``: the chunk runner's side of the rule."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate(self, items: Sequence[Item], **_: Any) -> list[ItemResult]:
        raise self.error


def _run(store: RedisStore, error: Exception, indices: list[int]) -> Any:
    published: list[dict[str, list[int]]] = []
    outcome = process_chunk(
        store,
        _FailingEngine(error),
        ChunkRef(job_id="j1", chunk_id="c000000", indices=indices),
        worker="w",
        max_attempts=3,
        publish=lambda _spec, chunks: published.append(chunks),
        control=store,
    )
    return outcome, published


def test_the_chunk_runner_records_what_retrying_cannot_cure(store: RedisStore) -> None:
    new_job(store, 2)
    outcome, published = _run(store, InsufficientMemory("no room"), [0, 1])
    assert outcome.outcome == ChunkOutcome.SPLIT and list(published[0]) == ["c000000.0", "c000000.1"]
    outcome, _ = _run(store, InsufficientMemory("no room"), [0])
    assert outcome.outcome == ChunkOutcome.DONE
    (result,) = [ItemResult.model_validate_json(v) for v in store.r.hvals(job_key("j1", "results"))]
    assert result.error_type == "insufficient_memory" and result.attempts == 2
    outcome, _ = _run(store, RuntimeError("boom"), [1])
    kept = {ItemResult.model_validate_json(v).error_type for v in store.r.hvals(job_key("j1", "results"))}
    assert kept == {"insufficient_memory", "generation_error"}


def test_the_chunk_runner_raises_a_transient_error(store: RedisStore) -> None:
    new_job(store, 2)
    with pytest.raises(StoreUnavailable):
        _run(store, StoreUnavailable("gone"), [0, 1])
    assert store.r.hlen(job_key("j1", "results")) == 0
