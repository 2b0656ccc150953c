"""Soak: one long job through a real Redis and a real worker that is SIGKILLed again and again.

    .venv/bin/python scripts/soak.py                       # 1,000 items, 10 kills (the documented run)
    .venv/bin/python scripts/soak.py --items 120 --kills 2 # the short version CI runs
    .venv/bin/python scripts/soak.py --json                # last line: one JSON report

It starts its own ``redis-server`` (append-only file on) on a free port and one ``genq-worker``
(tiny-random, fp32, visibility timeout 5 s).  While the job is in progress it waits until the
worker is generating a chunk that still has unwritten items, SIGKILLs it, and starts it again,
``--kills`` times spread evenly over the job's progress.  Then it collects the job and checks
every item: present, in input order, ``ok``.  Exit status 0 only if all of that holds and no item
was written twice.

Work done twice is counted from the worker's own ``results_written`` events (:mod:`tests.ledger`),
not from the collected output (a hash keyed by item index: it cannot hold a duplicate):
``duplicates`` is how many writes the store kept beyond the first of an item (first write wins:
0), ``dropped_items`` how many results were generated and then dropped, and
``wasted_token_ratio`` the completion tokens the worker generated ÷ those in the results (1.00:
nothing generated twice; tokens a killed process generated but never wrote are in no event).
``written_unlogged`` counts items stored by a process killed between the write and its log line.
Nothing here is mocked; the only test switch is ``GENQ_FAULT_SLOW_MS`` (a sleep per micro-batch)
so that a tiny model's chunk lasts long enough to be killed mid-way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import (
    RedisServer,
    WorkerProcess,
    final_status,
    job_counts,
    kill_mid_chunk,
    run_genq,
    wait_for,
    write_prompts,
)
from tests.ledger import Ledger

PROFILE = "tiny-random"


def soak(
    items: int, kills: int, chunk_size: int, visibility: int, slow_ms: int, folder: Path
) -> dict[str, Any]:
    server = RedisServer(folder / "redis")
    server.start()
    worker = WorkerProcess(
        server.url,
        folder / "worker.log",
        name="soak",
        env={"GENQ_VISIBILITY_TIMEOUT": str(visibility), "GENQ_FAULT_SLOW_MS": str(slow_ms)},
    )
    report: dict[str, Any] = {"items": items, "chunk_size": chunk_size, "visibility_timeout": visibility}
    try:
        worker.start()
        prompts = write_prompts(folder / "in.jsonl", items, max_new_tokens=6)
        started = time.monotonic()
        submitted = run_genq(
            server.url, "submit", str(prompts), "--profile", PROFILE, "--chunk-size", str(chunk_size)
        )
        job = submitted.stdout.split()[-1]
        r = server.client()
        in_flight_at_kills: list[int] = []
        for k in range(kills):
            target = items * (k + 1) // (kills + 2)
            wait_for(
                lambda t=target: int(job_counts(r, job)["succeeded"]) >= t, timeout=600, what=f"{target} done"
            )
            left = kill_mid_chunk(worker, r, job)
            if left is None:
                break  # the job ended first: count only real kills
            in_flight_at_kills.append(left)
            print(
                f"kill {k + 1}/{kills}: {job_counts(r, job)['succeeded']}/{items} done, {left} in flight",
                flush=True,
            )
            worker.start()
        status = wait_for(lambda: final_status(r, job), timeout=600, what="the job to end")
        seconds = time.monotonic() - started
        out = folder / "out.jsonl"
        run_genq(server.url, "collect", job, "-o", str(out))
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        ids = [row["id"] for row in rows]
        expected = [f"p{i:04d}" for i in range(items)]
        attempts = [int(v) for v in r.hgetall(f"genq:job:{job}:attempts").values()]
        ledger = Ledger.from_logs([worker.log_path], job)
        result_tokens = sum(int(row.get("usage", {}).get("completion_tokens", 0)) for row in rows)
        report.update(
            job=job,
            status=status,
            kills=len(in_flight_at_kills),
            items_in_flight_at_kills=in_flight_at_kills,
            collected=len(rows),
            lost=len(set(expected) - set(ids)),
            in_order=ids == expected,
            ok=sum(1 for row in rows if row["status"] == "ok"),
            errored=sum(1 for row in rows if row["status"] != "ok"),
            max_attempts=max(attempts, default=0),
            chunks_redelivered=sum(1 for a in attempts if a > 1),
            extra_deliveries=sum(a - 1 for a in attempts),
            worker_starts=worker.starts,
            seconds=round(seconds, 1),
            **ledger.summary(result_tokens),
            written_unlogged=items - ledger.written_items,
        )
    finally:
        worker.stop()
        server.stop()
    report["passed"] = (
        report.get("status") == "completed"
        and report.get("kills") == kills
        and report.get("lost") == 0
        and report.get("duplicates") == 0
        and report.get("in_order") is True
        and report.get("ok") == items
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--visibility-timeout", type=int, default=5)
    parser.add_argument("--slow-ms", type=int, default=20, help="Injected sleep per micro-batch.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep Redis, logs and output in this folder.")
    parser.add_argument("--json", action="store_true", help="Print the report as one JSON line last.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="genq-soak-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        report = soak(args.items, args.kills, args.chunk_size, args.visibility_timeout, args.slow_ms, folder)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>26}  {value}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
