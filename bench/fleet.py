"""A mixed fleet: one full-speed worker and one slowed to a fraction of a CPU by a cgroup.

    python -m bench.fleet [--json] [--items 480] [--new-tokens 200] [--chunk-size 24] [--quota 0.05]

Real ``redis-server``, real ``genq-worker start`` processes (one torch thread each) and, by
default, the tiny model: what is measured is scheduling (who runs which items when), and on the
shared 2-core machine the ~200M benchmark model (``--bench-model``) made one run last an hour.
A chunk of 24 items × 200 tokens takes seconds on the fast worker, as the figure needs.  The slow
worker runs in a cgroup v1 CPU group (``/sys/fs/cgroup/cpu/<group>``, ``cpu.cfs_quota_us`` =
``--quota`` × the period) that this benchmark creates and removes; where that is not writable it
prints why and skips.

Both workers load at full speed, then the slow one's group is limited.  The same job runs twice:
on both (``makespan_fleet``), then, the slow worker gone, on the fast worker alone
(``makespan_fast_alone``).  ``ideal`` is the job's completion tokens ÷ the sum of the two measured
rates (the fast worker's from its run alone, the slow worker's from its ``chunk_done`` events in
the fleet run), the makespan of a fleet that wastes nothing.  ``fleet_vs_fast_alone`` ≤ 1.0
means adding the slow worker never made the job slower; ``wasted_tokens`` are tokens generated
and not kept (the job's ``wasted_tokens``: backups at the tail), also as a fraction of the job's
completion tokens.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.fixtures import bench_home, bench_profile_yaml, emit, machine, mixed_prompts, table
from tests.cluster import RedisServer, WorkerProcess, log_events

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def cgroup_unavailable() -> str | None:
    """Why a CPU cgroup cannot be made here (None: it can)."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU}"
    if not os.access(CGROUP_CPU, os.W_OK):
        return f"{CGROUP_CPU} is not writable (run as root)"
    return None


@contextmanager
def cpu_group() -> Iterator[Path]:
    """A cgroup v1 CPU group, unlimited until :func:`limit` is called; removed afterwards (its
    processes must be gone by then)."""
    group = CGROUP_CPU / f"genq-bench-slow-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text("-1")
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # a process that is just exiting still counts as a member
                time.sleep(0.1)


def limit(group: Path, fraction: float) -> None:
    """Limit ``group`` to ``fraction`` of one CPU."""
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(fraction * PERIOD_US))))


def in_group(group: Path) -> list[str]:
    """A command prefix that moves the process into ``group`` before it starts the worker."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group)]


def run_job(
    server: RedisServer,
    profile: Path,
    records: list[dict[str, Any]],
    chunk_size: int,
    workers: list[WorkerProcess],
    job_id: str,
) -> dict[str, Any]:
    from producer import Client

    client = Client(server.url)
    started = time.perf_counter()
    job = client.submit(records, profile=str(profile), chunk_size=chunk_size, job_id=job_id)
    state = job.wait(timeout=7200)
    seconds = time.perf_counter() - started
    assert state.counts.succeeded == len(records), state.as_dict()
    r = server.client()
    # a slower worker may still run items a backup has written: what it generates is waste,
    # counted when it writes them; wait for it (the job is already complete)
    deadline = time.monotonic() + 900
    while r.hlen(f"genq:job:{job.id}:running") and time.monotonic() < deadline:
        time.sleep(1.0)
    raw = r.hgetall(f"genq:job:{job.id}")
    per_worker = {name: stats.get("items", 0) for name, stats in state.workers.items()}
    return {
        "job": job.id,
        "seconds": seconds,
        "tokens": int(raw.get("completion_tokens", 0)),
        "wasted_tokens": int(raw.get("wasted_tokens", 0)),
        "wasted_items": int(raw.get("wasted_items", 0)),
        "per_worker": per_worker,
        "backups": sum(len(log_events(w.log_path, "backup_started", job=job.id)) for w in workers),
    }


def token_rate(worker: WorkerProcess, job: str) -> float | None:
    """Completion tokens per second ``worker`` generated while running chunks of ``job`` (kept or
    not), from its ``chunk_done`` events."""
    done = log_events(worker.log_path, "chunk_done", job=job)
    seconds = sum(float(str(e["seconds"])) for e in done)
    tokens = sum(int(str(e["tokens"])) for e in done)
    return tokens / seconds if seconds > 0 and tokens else None


def warm(server: RedisServer, profile: Path) -> None:
    from producer import Client

    client = Client(server.url)
    client.submit([{"id": "warm", "prompt": "warm up", "max_new_tokens": 2}], profile=str(profile)).wait(
        timeout=600
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="genq: a full-speed worker and a cgroup-slowed one")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--items", type=int, default=480)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=24)
    parser.add_argument("--quota", type=float, default=0.05, help="the slow worker's share of one CPU")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (the default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the median is reported")
    parser.add_argument("--logs", type=Path, help="copy the workers' logs here")
    parser.add_argument("--bench-model", action="store_true", help="the ~200M benchmark model instead")
    args = parser.parse_args(argv)

    reason = cgroup_unavailable()
    if reason is not None:
        print(f"[fleet] skipped: {reason}", flush=True)
        result: dict[str, Any] = {"benchmark": "fleet", "skipped": reason}
        if args.json:
            emit(result)
        return result

    home = bench_home()
    with tempfile.TemporaryDirectory(prefix="genq-bench-fleet-") as tmp:
        folder = Path(tmp)
        profile = bench_profile_yaml(folder, tiny=not args.bench_model, home=home)
        items = mixed_prompts(profile, args.items, args.new_tokens)
        records = [{"id": it.id, "prompt": it.prompt, "max_new_tokens": args.new_tokens} for it in items]
        server = RedisServer(folder / "redis")
        server.start()
        env = {"GENQ_THREADS": "1"}
        fast = WorkerProcess(
            server.url, folder / "fast.log", profile=str(profile), mode="fp32", name="fast", env=env
        )
        fleets: list[dict[str, Any]] = []
        alone: list[dict[str, Any]] = []
        try:
            with cpu_group() as group:
                slow = WorkerProcess(
                    server.url,
                    folder / "slow.log",
                    profile=str(profile),
                    mode="fp32",
                    name="slow",
                    env=env,
                    prefix=in_group(group),
                )
                try:
                    # both load at full speed; then the slow one gets its share of a CPU
                    for w in (fast, slow):
                        w.start(wait=False)
                    for w in (fast, slow):
                        w.wait_ready(900)
                    in_cgroup = bool((group / "cgroup.procs").read_text().split())
                    warm(server, profile)
                    limit(group, args.quota)
                    share = f"{args.quota:.0%} of a CPU"
                    for rep in range(args.repeat):
                        print(f"[fleet] fast + slow ({share}): {len(records)} items", flush=True)
                        run = run_job(server, profile, records, args.chunk_size, [fast, slow], f"fleet-{rep}")
                        run["slow_tok_s"] = token_rate(slow, run["job"])
                        fleets.append(run)
                        print(f"[fleet] fleet: {run['seconds']:.1f} s", flush=True)
                finally:
                    slow.kill()
            for rep in range(args.repeat):
                print("[fleet] the fast worker alone ...", flush=True)
                alone.append(run_job(server, profile, records, args.chunk_size, [fast], f"alone-{rep}"))
                print(f"[fleet] fast alone: {alone[-1]['seconds']:.1f} s", flush=True)
        finally:
            with suppress(Exception):
                fast.stop()
            server.stop()
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in folder.glob("*.log"):
                    shutil.copy(log, args.logs / log.name)

    n = len(records)
    # the median run of each (by makespan); the machine's load moves single runs
    fleet = sorted(fleets, key=lambda x: x["seconds"])[(len(fleets) - 1) // 2]
    solo = sorted(alone, key=lambda x: x["seconds"])[(len(alone) - 1) // 2]
    slow_speed = fleet["slow_tok_s"]
    fast_speed = solo["tokens"] / solo["seconds"]
    ideal = fleet["tokens"] / (fast_speed + (slow_speed or 0.0))
    result = {
        "benchmark": "fleet",
        **machine(),
        "items": n,
        "new_tokens": args.new_tokens,
        "chunk_size": args.chunk_size,
        "slow_cpu_quota": args.quota,
        "slow_in_cgroup": in_cgroup,
        "model": "bench-200m" if args.bench_model else "tiny-random",
        "makespan_fast_alone": round(solo["seconds"], 2),
        "makespan_fleet": round(fleet["seconds"], 2),
        "runs_fast_alone": [round(x["seconds"], 2) for x in alone],
        "runs_fleet": [round(x["seconds"], 2) for x in fleets],
        "ideal": round(ideal, 2),
        "fast_tok_s": round(fast_speed, 2),
        "slow_tok_s": round(slow_speed, 2) if slow_speed else None,
        "fleet_vs_fast_alone": round(fleet["seconds"] / solo["seconds"], 3),
        "fleet_vs_ideal": round(fleet["seconds"] / ideal, 3),
        "items_per_worker": fleet["per_worker"],
        "backups": fleet["backups"],
        "job_tokens": fleet["tokens"],
        "wasted_tokens": fleet["wasted_tokens"],
        "wasted_items": fleet["wasted_items"],
        "wasted_fraction": round(fleet["wasted_tokens"] / fleet["tokens"], 4) if fleet["tokens"] else None,
        "command": "python -m bench.fleet " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    table(
        f"fleet: a full-speed worker and one at {args.quota:.0%} of a CPU (1 torch thread each)",
        [
            ("fast alone", f"{result['makespan_fast_alone']} s", ""),
            ("fleet", f"{result['makespan_fleet']} s", f"items per worker {result['items_per_worker']}"),
            (
                "ideal",
                f"{result['ideal']} s",
                f"fast {result['fast_tok_s']}, slow {result['slow_tok_s']} tok/s",
            ),
            ("fleet / fast alone", str(result["fleet_vs_fast_alone"]), ""),
            ("fleet / ideal", str(result["fleet_vs_ideal"]), ""),
            ("wasted", f"{result['wasted_tokens']} tokens", f"{result['wasted_fraction']} of the job's"),
        ],
    )
    if args.json:
        emit(result)
    return result


if __name__ == "__main__":
    main()
