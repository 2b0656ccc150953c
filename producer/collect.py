"""Writing a job's results: the output file, and errored items to their own file on request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from producer.client import Job
from worker.core.schema import Item, ItemResult


def write_collected(
    job: Job, output: Path, fmt: str, include_unfinished: bool, errors: Path | None = None
) -> tuple[int, int, int, int]:
    """Write the job's results (input order, streamed), errored items to ``errors`` when given;
    returns (written, pending, ended, errored rows written to ``errors``)."""
    from worker.core.counting import NOT_RUN_CODES
    from worker.core.outputs import write_results, write_split

    counts = {"pending": 0, "ended": 0}
    spec = job.client.store.spec(job.id)

    def rows() -> Iterator[tuple[ItemResult, Item]]:
        for _index, result, item in job.pairs():
            if result is None:
                counts["pending"] += 1
                continue
            if result.error_type in NOT_RUN_CODES:
                counts["ended"] += 1
                if not include_unfinished:
                    continue
            yield result, item

    if errors is None:
        written, errored = write_results(rows(), output, fmt, model=spec.profile), 0  # type: ignore[arg-type]
    else:
        written, errored = write_split(rows(), output, errors, fmt, model=spec.profile)  # type: ignore[arg-type]
    job.client.store.record_files(
        job.id, output=str(output.resolve()), errors=str(errors.resolve()) if errors else None
    )
    return written, counts["pending"], counts["ended"], errored
