"""Several jobs on one fleet, with a real worker process: a high-priority job overtakes a low one,
and a small job of the same priority shares the worker with a big one instead of waiting behind it.

One worker serves both tests (the model loads once); each test ends its big job by cancelling it.
The order of things is read from the worker's own events (``results_written``, ``chunk_done``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from producer import Client
from tests.cluster import log_events
from tests.helpers import RedisServer, WorkerProcess, genq, wait_for, write_prompts
from worker.core.states import JobStatus

PROFILE = "tiny-random"


class Fleet:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.redis = RedisServer(folder / "redis", appendonly=False)
        self.worker = WorkerProcess("", folder / "worker.log", name="fleet-w1")

    def start(self) -> None:
        self.redis.start()
        self.worker.redis_url = self.worker.observe_url = self.redis.url
        self.worker.start()
        self.client = Client(self.redis.url)

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()

    def events(self, event: str, job: str) -> list[tuple[float, str]]:
        """``(time, chunk)`` of the worker's ``event`` events for ``job``, in the log's order."""
        return [
            (datetime.fromisoformat(str(e["timestamp"])).timestamp(), str(e["chunk"]))
            for e in log_events(self.worker.log_path, event, job=job)
        ]

    def chunk_events(self, job: str) -> list[tuple[float, dict[str, object]]]:
        """``(time, event)`` of the worker's ``chunk_done`` events for ``job``."""
        return [
            (datetime.fromisoformat(str(e["timestamp"])).timestamp(), e)
            for e in log_events(self.worker.log_path, "chunk_done", job=job)
        ]

    def wait_done(self, job: str, timeout: float) -> float:
        state = self.client.job(job).wait(timeout=timeout, poll=0.2)
        assert state.status == JobStatus.COMPLETED, state.status
        return time.time()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    f.start()
    try:
        yield f
    finally:
        f.stop()


def test_a_high_job_overtakes_a_running_low_job(fleet: Fleet, tmp_path: Path) -> None:
    low = genq(
        fleet.redis.url,
        "submit",
        str(write_prompts(tmp_path / "low.jsonl", 2000, max_new_tokens=2, prefix="low")),
        "--profile",
        PROFILE,
        "--chunk-size",
        "16",
        "--priority",
        "low",
    ).stdout.strip()
    assert fleet.client.store.spec(low).priority == "low"
    wait_for(lambda: len(fleet.events("chunk_done", low)) >= 2, timeout=60, what="the low job to run")
    asked = time.time()
    high = fleet.client.submit(
        write_prompts(tmp_path / "high.jsonl", 64, max_new_tokens=2, prefix="high"),
        profile=PROFILE,
        chunk_size=16,
        priority="high",
    ).id
    queued = time.time()  # the high job's chunks are on its queue by now
    fleet.wait_done(high, timeout=60)
    fleet.client.job(low).cancel()

    first_high = fleet.events("results_written", high)[0][0]
    last_high = fleet.events("chunk_done", high)[-1][0]
    low_done = [(t, t - float(e["seconds"])) for t, e in fleet.chunk_events(low)]
    # its first result comes before the low job's next 5 chunks: in fact after the one in flight
    assert len([t for t, _ in low_done if asked < t < first_high]) < 5
    assert len([t for t, _ in low_done if queued < t < first_high]) <= 1
    # and no low chunk starts once its chunks are queued, until it has finished
    assert [s for _, s in low_done if queued < s < last_high] == []
    assert fleet.client.job(low).status().counts.succeeded < 2000


@pytest.mark.parametrize("big_mode", ["any", "fp32"])
def test_a_small_job_shares_the_worker_with_a_big_one(fleet: Fleet, tmp_path: Path, big_mode: str) -> None:
    """A small `any` job after a big one, on the fp32 worker: the big one `any` too, or pinned to
    fp32 (whose queue the worker takes first: the dispatcher shares it with `any` jobs)."""
    big = fleet.client.submit(
        write_prompts(tmp_path / "big.jsonl", 20_000, max_new_tokens=1, prefix="big"),
        profile=PROFILE,
        chunk_size=16,
        mode=big_mode,
    ).id
    wait_for(lambda: fleet.events("chunk_done", big), timeout=60, what="the big job to run")
    submitted = time.time()
    small = fleet.client.submit(
        # a prefix of its own per case: the same file would be the same job (its id comes from the
        # content), already completed by the case before, and "shared" nothing
        write_prompts(tmp_path / "small.jsonl", 200, max_new_tokens=1, prefix=f"small-{big_mode}"),
        profile=PROFILE,
        chunk_size=16,
    ).id
    finished = fleet.wait_done(small, timeout=60)
    big_done = fleet.client.job(big).status().counts.succeeded
    fleet.client.job(big).cancel()
    assert big_done < 10_000, big_done

    # round robin: while the small job ran, the big one got about as many chunks as it did
    # the job completes with its last results; that chunk's chunk_done is logged a moment later
    def all_small() -> list[tuple[float, str]]:
        found = fleet.events("chunk_done", small)
        return found if len(found) == 13 else []

    small_chunks = wait_for(all_small, timeout=10, what="the small job's 13 chunk_done events")
    # while it ran: from its first chunk done to its last (not to when the 0.2 s status poll saw
    # it complete: a few more big chunks run in that gap, which says nothing of the sharing)
    ran = (small_chunks[0][0], small_chunks[-1][0])
    big_meanwhile = [t for t, _ in fleet.events("chunk_done", big) if ran[0] <= t <= ran[1]]
    assert len(small_chunks) // 2 <= len(big_meanwhile) <= len(small_chunks) + 2, (
        len(big_meanwhile),
        len(small_chunks),
    )
    seconds = finished - submitted
    per_chunk = (small_chunks[-1][0] - small_chunks[0][0]) / max(
        1, len(small_chunks) + len(big_meanwhile) - 1
    )
    print(
        f"\nsmall job: {seconds:.2f} s after submit; {len(big_meanwhile)} big chunks meanwhile; "
        f"~{per_chunk:.3f} s per chunk, so alone on half the worker ≈ {2 * 13 * per_chunk:.2f} s; "
        f"big job had {big_done} of 20000 items done"
    )
