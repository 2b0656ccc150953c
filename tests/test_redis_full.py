"""Redis at maxmemory during a run, with a real redis-server and a real worker process: the worker
says so in one line (naming maxmemory, used and max memory and what to do) at most once a minute,
waits instead of reconnecting six times a second, `genq status JOB` names the condition, and the
job completes once memory is freed.  And a worker's start (as root here) prints only genq's lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.cluster import final_status
from tests.helpers import RedisServer, WorkerProcess, genq, wait_for, write_prompts

PROFILE = "tiny-random"
FULL_SECONDS = 25.0
"""How long Redis stays full: well under the notice's minute, long enough for Celery's consumer to
restart some 150 times without genq's back-off (6 a second)."""


def events(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_a_worker_at_maxmemory_warns_once_waits_and_finishes_the_job(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    r = redis_server.client()
    worker = WorkerProcess(
        redis_server.url,
        tmp_path / "worker.log",
        # slow chunks: the job is still running when Redis fills up; offline, as in a container
        env={"GENQ_FAULT_SLOW_MS": "300", "HF_HUB_OFFLINE": "1"},
    ).start()
    try:
        started = worker.log_path.read_text(errors="replace").splitlines()
        # quiet start: every line is one of genq's JSON events (Celery's own lines are routed to
        # genq's log format), none of Celery's warning blocks or the kernels trust-check line
        assert started and all(line.startswith("{") for line in started if line.strip()), started
        text = "\n".join(started)
        for noise in ("SecurityWarning", "superuser", "Skipping publisher trust", "Deprecation"):
            assert noise not in text

        job = genq(
            redis_server.url, "submit", str(write_prompts(tmp_path / "p.jsonl", 200)), "--profile", PROFILE
        ).stdout.strip()
        wait_for(lambda: int(r.hget(f"genq:job:{job}", "succeeded") or 0) > 0, 120, what="a first result")
        mark = len(worker.log_path.read_text(errors="replace").splitlines())
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", str(used - 200_000))
        time.sleep(FULL_SECONDS / 2)
        status = genq(redis_server.url, "status", job).stdout
        assert "Redis is at its maxmemory" in status and "genq prune" in status, status
        as_json = json.loads(genq(redis_server.url, "status", job, "--json").stdout)
        assert "maxmemory" in as_json["redis_full"]
        time.sleep(FULL_SECONDS / 2)
        during = worker.log_path.read_text(errors="replace").splitlines()[mark:]
        r.config_set("maxmemory", "0")

        notices = [e for e in events(during) if e["event"] == "redis_maxmemory"]
        assert len(notices) == 1, notices
        notice = notices[0]
        assert notice["level"] == "warning" and "maxmemory" in str(notice["message"])
        assert int(str(notice["maxmemory"])) == used - 200_000 and int(str(notice["used_memory"])) > 0
        assert "genq delete" in str(notice["message"]) and "CONFIG SET maxmemory" in str(notice["message"])
        # besides it, at most the hand-back of the one chunk in flight: no "Cannot connect",
        # "Frequent restarts" or heartbeat_failed
        others = [
            e
            for e in events(during)
            if e.get("level") in ("warning", "error", "critical") and e["event"] != "redis_maxmemory"
        ]
        assert len(others) <= 1 and all("store_full: chunk handed back" in str(e["event"]) for e in others), (
            others
        )
        assert all(line.startswith("{") for line in during if line.strip()), during

        wait_for(lambda: final_status(r, job), 240, interval=1, what="the job to complete")
        assert (final_status(r, job), int(r.hget(f"genq:job:{job}", "succeeded") or 0)) == ("completed", 200)
    finally:
        worker.stop()


def test_a_worker_that_starts_against_a_full_redis_waits_quietly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """No chunk in flight: Celery's consumer itself meets the full Redis (a delivery writes
    kombu's unacked hash).  It waits, longer each time, instead of restarting six times a second,
    and the one line a minute is the worker's only warning; once freed, the job completes."""
    r = redis_server.client()
    job = genq(
        redis_server.url, "submit", str(write_prompts(tmp_path / "p.jsonl", 48)), "--profile", PROFILE
    ).stdout.strip()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) - 100_000))
    worker = WorkerProcess(redis_server.url, tmp_path / "worker.log").start(wait=False)
    try:
        wait_for(lambda: "redis_maxmemory" in worker.log_tail(100_000), 120, interval=0.5, what="the notice")
        time.sleep(FULL_SECONDS)
        during = worker.log_path.read_text(errors="replace").splitlines()
        r.config_set("maxmemory", "0")
        loud = [e for e in events(during) if e.get("level") in ("warning", "error", "critical")]
        assert [e["event"] for e in loud] == ["redis_maxmemory"], loud
        assert all(line.startswith("{") for line in during if line.strip()), during
        wait_for(lambda: final_status(r, job), 240, interval=1, what="the job to complete")
        assert int(r.hget(f"genq:job:{job}", "succeeded") or 0) == 48
    finally:
        worker.stop()


def test_a_lease_renewal_and_the_heartbeat_at_maxmemory_speak_only_through_the_notice(
    redis_server: RedisServer,
) -> None:
    """The renewal of a running chunk's lease and the heartbeat's hooks (the look for lost
    messages writes its lock each period) meet the full Redis too: they say so through the one
    notice, not with a ``lease_renewal_failed`` or ``heartbeat_hook_failed`` line each time (CI
    once saw a renewal's warning beside the notice, while the handed-back chunk waited for room)."""
    import functools

    from structlog.testing import capture_logs

    from worker.core.logs import get_logger
    from worker.core.settings import Settings
    from worker.queue.leases import LeaseKeeper
    from worker.queue.messages import UNACKED_INDEX
    from worker.queue.recovery import recovery_hook
    from worker.runtime import Runtime
    from worker.store.memory import full_notice

    r = redis_server.client()
    r.zadd(UNACKED_INDEX, {"tag-1": time.time()})
    notice = full_notice()
    notice.owner, notice._last = None, -float("inf")
    get_logger()  # genq's logging set up first: capture_logs replaces its processors
    with capture_logs() as logs:
        runtime = Runtime(Settings.from_env({"GENQ_BROKER_URL": redis_server.url}), name="w-full")
        runtime.beat_hooks.append(functools.partial(recovery_hook, runtime))
        keeper = LeaseKeeper(runtime)
        with keeper.hold("tag-1", "j1", "c000000"):
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", str(int(r.info("memory")["used_memory"]) - 100_000))
            try:
                for _ in range(3):
                    keeper.renew()
                    runtime.beat()
            finally:
                r.config_set("maxmemory", "0")
    loud = [e["event"] for e in logs if e.get("log_level") in ("warning", "error", "critical")]
    assert loud == ["redis_maxmemory"], logs
