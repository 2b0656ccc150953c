"""Test helpers: the local cluster harness (real redis-server, real worker processes) lives in
bench/cluster.py so the benchmarks drive exactly what the tests drive."""

from bench.cluster import (
    REPO,
    RedisServer,
    WorkerProcess,
    env_for,
    free_port,
    wait_for,
    write_prompts,
)

__all__ = ["REPO", "RedisServer", "WorkerProcess", "env_for", "free_port", "wait_for", "write_prompts"]
