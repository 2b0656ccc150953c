"""Backup execution at a job's tail, with real worker processes.

A slow worker (the one-row profile, sleeping :data:`SLOW_MS` after each micro-batch of 4 items)
runs the only chunk of a job; a full-speed worker, started once the slow one runs it, first runs
a small job of its own (so that its speed is measured), then finds nothing queued: it takes over
the slow worker's unfinished items (a backup chunk), and the slow worker, checking between its
micro-batches, stops on the items the backup recorded.  Results stay exactly once and what was
generated and not kept is counted on the job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster import final_status, in_flight, job_counts, log_events
from tests.helpers import RedisServer, WorkerProcess, genq, one_row_profile, wait_for, write_prompts
from tests.ledger import Ledger
from worker.chunks import backup_id

PROFILE = "tiny-rows1"
SLOW_MS = 8000
ITEMS = 32
"""One chunk: 8 micro-batches × 8 s on the slow worker."""


def test_an_idle_fast_worker_takes_over_the_tail_of_a_slow_workers_chunk(tmp_path: Path) -> None:
    configs = one_row_profile(tmp_path, PROFILE)
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = {"GENQ_CONFIGS_DIR": str(configs)}
    slow_env = {**env, "GENQ_FAULT_SLOW_MS": str(SLOW_MS)}
    slow = WorkerProcess(server.url, tmp_path / "slow.log", profile=PROFILE, name="slow", env=slow_env)
    fast = WorkerProcess(server.url, tmp_path / "fast.log", profile=PROFILE, name="fast", env=env)
    try:
        slow.start()
        r = server.client()
        prompts = write_prompts(tmp_path / "in.jsonl", ITEMS, max_new_tokens=6)
        args = ["submit", str(prompts), "--profile", PROFILE, "--chunk-size", str(ITEMS)]
        job = genq(server.url, *args, GENQ_CONFIGS_DIR=str(configs)).stdout.split()[-1]
        wait_for(lambda: in_flight(r, job, worker="slow"), timeout=120, what="the slow worker to start")
        fast.start()
        warm = write_prompts(tmp_path / "warm.jsonl", 2, max_new_tokens=2, prefix="w")
        genq(server.url, "submit", str(warm), "--profile", PROFILE, GENQ_CONFIGS_DIR=str(configs))
        assert wait_for(lambda: final_status(r, job), timeout=300, what="the job's end") == "completed"
        chunk = "c000000"
        backups = log_events(fast.log_path, "backup_started")
        if not backups:
            pytest.fail(f"no backup started; fast log: {fast.log_tail(3000)}")
        assert [(b["job"], b["chunk"], b["holder"]) for b in backups] == [(job, chunk, "slow")]
        # the slow worker noticed and ran only what was left (nothing, or a part)
        done = wait_for(
            lambda: log_events(slow.log_path, "chunk_done", job=job), timeout=120, what="slow's end"
        )
        assert log_events(slow.log_path, "chunk_shared", job=job)
        stored = {int(i): json.loads(v) for i, v in r.hgetall(f"genq:job:{job}:results").items()}
        by = {w: sum(1 for x in stored.values() if x["worker"] == w) for w in ("slow", "fast")}
        assert by["fast"] > 0 and by["slow"] > 0 and sum(by.values()) == ITEMS, by
        counts = job_counts(r, job)
        assert counts["succeeded"] == ITEMS and counts["status"] == "completed"
        raw = r.hgetall(f"genq:job:{job}")
        assert int(raw["completion_tokens"]) == sum(x["usage"]["completion_tokens"] for x in stored.values())
        ledger = Ledger.from_logs([slow.log_path, fast.log_path], job)
        assert sorted(ledger.writers()) == list(range(ITEMS)) and ledger.duplicates == 0
        # wasted work: what the workers generated and the store dropped, counted on the job
        dropped_tokens = sum(
            int(str(e["dropped_tokens"]))
            for path in (slow.log_path, fast.log_path)
            for e in log_events(path, "results_written", job=job)
        )
        assert int(raw.get("wasted_tokens", 0)) == dropped_tokens
        assert int(raw.get("wasted_items", 0)) == ledger.dropped_items
        assert r.hexists(f"genq:job:{job}:chunks", backup_id(chunk))
        report = {
            "items": ITEMS,
            "written_by": by,
            "slow_chunk_seconds": done[0]["seconds"],
            "wasted_tokens": int(raw.get("wasted_tokens", 0)),
            **ledger.summary(int(raw["completion_tokens"])),
        }
        print("\nBACKUP " + json.dumps(report))
    finally:
        fast.stop()
        slow.stop()
        server.stop()
