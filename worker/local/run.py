"""Running a job embedded: read what the output already answers, generate the rest through the
same chunk runner as a worker, append each result as it comes, reorder once at the end."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.chunks import chunk_count, chunk_id, chunk_range, process_chunk
from worker.core.identity import item_digest, job_context
from worker.core.jobstate import JobState
from worker.core.logs import get_logger
from worker.core.outputs import OutputFormat, check_output_path, read_done, row_count_field, trim_partial_line
from worker.core.profiles import Profile
from worker.core.schema import ChunkRef, Counts, Item, JobSpec
from worker.core.settings import get_settings
from worker.core.states import LoadMode
from worker.core.throughput import Throughput, record_local
from worker.local.manifest import plan_resume, rewrite_rows, write_manifest
from worker.local.store import WORKER, LocalStore


@dataclass
class EmbeddedReport:
    total: int
    resumed: int
    changed: int
    generated: int
    counts: Counts
    completion_tokens: int
    seconds: float
    mode: str
    output: Path

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "resumed": self.resumed,
            "changed": self.changed,
            "generated": self.generated,
            "counts": self.counts.as_dict(),
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.completion_tokens / max(self.seconds, 1e-9), 2),
            "mode": self.mode,
            "output": str(self.output),
        }


def run_embedded(
    spec: JobSpec,
    items: list[Item],
    output: Path,
    *,
    profile: Profile,
    fmt: OutputFormat = "native",
    mode: LoadMode | str = LoadMode.AUTO,
    on_progress: Callable[[JobState], None] | None = None,
    max_attempts: int = 3,
) -> EmbeddedReport:
    """Generate every item whose answer ``output`` does not already hold, appending results as
    they finish; the output ends in input order, one row per item.  ``profile`` is the job's
    (``spec.profile``), as the caller loaded it: nothing here reads it again."""
    started = time.monotonic()
    log = get_logger(job=spec.job_id, worker=WORKER)
    check_output_path(output, inputs=[spec.source] if spec.source else [])
    context = job_context(profile, spec.defaults, spec.system_prompt)
    digests = [(item, item_digest(item, context)) for item in items]
    trim_partial_line(output)
    plan = plan_resume(output, digests, fmt)
    if plan.changed:
        first = plan.changed[0]
        log.warning(
            "regenerating_changed_items",
            items=len(plan.changed),
            first_line=first.line,
            first_id=first.id,
        )
    rewrite_rows(output, items, plan.keep)  # only rows that answer this input's requests
    write_manifest(output, fmt, spec.profile, spec.source or "", ((it.id, d) for it, d in digests))
    done = {it.index: row_count_field(plan.keep[it.id]) for it in items if it.id in plan.keep}
    loaded_mode = "-"
    with open(output, "a", encoding="utf-8") as out:
        store = LocalStore(spec, items, out, fmt, done)
        if on_progress:
            store.on_record = lambda: on_progress(store.state())
            on_progress(store.state())
        if len(done) < len(items):
            loaded_mode = _generate(spec, profile, items, store, mode, max_attempts)
    rewrite_rows(output, items, read_done(output))
    return EmbeddedReport(
        total=len(items),
        resumed=len(done),
        changed=len(plan.changed),
        generated=store.counts.finished - len(done),
        counts=store.counts,
        completion_tokens=store.completion_tokens,
        seconds=time.monotonic() - started,
        mode=loaded_mode,
        output=output,
    )


def _generate(
    spec: JobSpec,
    profile: Profile,
    items: list[Item],
    store: LocalStore,
    mode: LoadMode | str,
    max_attempts: int,
) -> str:
    """Load the model and run every chunk with something left to do; returns the mode used."""
    from worker.engine import build_engine
    from worker.model.loading import load_model

    loaded = load_model(profile, mode)
    engine = build_engine(loaded, worker=WORKER)
    started, tokens_before = time.monotonic(), store.completion_tokens
    queue: deque[tuple[str, list[int]]] = deque(
        (chunk_id(n), list(chunk_range(n, len(items), spec.chunk_size)))
        for n in range(chunk_count(len(items), spec.chunk_size))
    )

    def publish(_spec: JobSpec, children: dict[str, list[int]]) -> None:
        queue.extendleft(reversed(list(children.items())))

    while queue:
        cid, indices = queue.popleft()
        if not store.pending_indices(spec.job_id, indices):
            continue
        ref = ChunkRef(job_id=spec.job_id, chunk_id=cid, indices=indices)
        process_chunk(store, engine, ref, worker=WORKER, max_attempts=max_attempts, publish=publish)
    _record_speed(spec.profile, loaded, store.completion_tokens - tokens_before, time.monotonic() - started)
    return str(loaded.mode)


def _record_speed(profile: str, loaded: Any, tokens: int, seconds: float) -> None:
    """Keep this machine's measured speed for `genq estimate` (runs of a few tokens say little)."""
    if tokens < 64 or seconds <= 0:
        return
    from worker.engine.cpu import cpu_name

    if loaded.device == "cuda":
        import torch

        hardware = str(torch.cuda.get_device_name(0))
    else:
        hardware = cpu_name()
    measured = Throughput(
        profile=profile,
        mode=str(loaded.mode),
        device=str(loaded.device),
        hardware=hardware,
        tokens_per_second=round(tokens / seconds, 2),
        measured_at=time.time(),
        source=WORKER,
    )
    try:
        record_local(get_settings().home, measured)
    except OSError as exc:  # a speed note must never fail a run
        get_logger().warning("throughput_not_recorded", error=str(exc))
