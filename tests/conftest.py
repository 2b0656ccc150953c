"""Shared fixtures: an isolated genq home with the tiny model, loaded models, a real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RedisServer

# Test tiers (unit, model, redis, process), decided per test from what it uses: tests/tiers.py.
pytest_plugins = ["tests.tiers", "pytester"]

# Every test (and every worker process a test starts) uses its own genq home, so no test depends
# on what a previous run left in ~/.cache.
_HOME = Path(
    os.environ.get("GENQ_TEST_HOME") or Path(__file__).resolve().parent.parent / ".genq" / "test-home"
)
os.environ["GENQ_HOME"] = str(_HOME)
os.environ.setdefault("GENQ_LOG_FORMAT", "json")
os.environ.pop("GENQ_BROKER_URL", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def genq_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def tiny_profile():  # type: ignore[no-untyped-def]
    from worker.core.profiles import load_profile
    from worker.core.settings import reset_settings

    reset_settings()
    return load_profile("tiny-random")


@pytest.fixture(scope="session")
def loaded_fp32(tiny_profile):  # type: ignore[no-untyped-def]
    from worker.model.loading import load_model

    return load_model(tiny_profile, "fp32")


@pytest.fixture(scope="session")
def loaded_nf4(tiny_profile):  # type: ignore[no-untyped-def]
    from worker.model.loading import load_model

    return load_model(tiny_profile, "nf4")


@pytest.fixture
def redis_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, append-only file on, in a temporary folder."""
    from tests.tiers import unit_guard_on

    if unit_guard_on(request.config):
        pytest.fail(
            f"{request.node.nodeid} asks for a redis-server in the unit tier (-m unit)", pytrace=False
        )
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
