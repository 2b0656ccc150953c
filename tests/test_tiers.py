"""The test tiers (tests/tiers.py): each test is classified from what it uses, and the unit tier
really starts nothing.  Runs pytest in this process (pytester) on a small test file."""

from __future__ import annotations

import pytest

from tests.tiers import TIERS

SAMPLE = """
import subprocess

import pytest

from tests.cluster import RedisServer, WorkerProcess
from tests.helpers import genq


def start_a_shell():
    subprocess.run(["true"], check=True)


@pytest.fixture
def my_redis(tmp_path):
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fleet(my_redis, tmp_path):
    return WorkerProcess(my_redis.url, tmp_path / "w.log")


def test_pure():
    assert sum([1, 2]) == 3


def test_via_fixture(my_redis):
    assert my_redis.client().ping()


def test_via_conftest_fixture(redis_server):
    assert redis_server.client().ping()


def test_via_fixture_of_a_fixture(fleet):
    pass


def test_via_helper():
    start_a_shell()


def test_via_shared_helper():
    genq(None, "--help")


def test_local_import():
    import multiprocessing

    assert multiprocessing.cpu_count()


def test_loads_a_model():
    from worker.model.loading import load_model

    assert load_model


@pytest.mark.process
def test_declared():
    pass


def test_hidden_spawn():
    getattr(__import__("sub" + "process"), "run")(["true"])


def test_hidden_redis_server(request):
    request.getfixturevalue("redis_server")


def test_hidden_redis():
    import importlib

    importlib.import_module("re" + "dis").Redis(port=1, socket_connect_timeout=0.1).ping()
"""

# hypothesis' plugin would import hypothesis afresh in each inner run (seconds)
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-q")

EXPECTED = {
    "test_pure": "unit",
    "test_via_fixture": "redis",
    "test_via_conftest_fixture": "redis",
    "test_via_fixture_of_a_fixture": "process",
    "test_via_helper": "process",
    "test_via_shared_helper": "process",
    "test_local_import": "process",
    "test_loads_a_model": "model",
    "test_declared": "process",
    "test_hidden_spawn": "unit",  # the scan cannot see it: the guard below catches it
    "test_hidden_redis_server": "unit",
    "test_hidden_redis": "unit",
}


@pytest.fixture
def sample(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(
        "from tests.conftest import redis_server  # noqa: F401\npytest_plugins = ['tests.tiers']\n"
    )
    pytester.makepyfile(test_sample=SAMPLE)
    return pytester


def test_each_test_gets_the_tier_of_what_it_uses(sample: pytest.Pytester) -> None:
    items, _ = sample.inline_genitems("-p", "no:cacheprovider")
    got = {item.name: [m.name for m in item.iter_markers() if m.name in TIERS] for item in items}
    assert got == {name: [tier] for name, tier in EXPECTED.items()}


def test_the_unit_tier_fails_a_test_that_starts_a_process_or_talks_to_redis(sample: pytest.Pytester) -> None:
    result = sample.runpytest("-m", "unit", *QUIET)
    result.assert_outcomes(passed=1, failed=3)
    text = result.stdout.str()
    assert "test_hidden_spawn runs in the unit tier but started a process" in text
    assert "test_hidden_redis runs in the unit tier but connected to Redis" in text
    assert "test_hidden_redis_server asks for a redis-server in the unit tier" in text


@pytest.mark.process  # its sample test starts `true`
def test_outside_the_unit_tier_nothing_is_guarded(sample: pytest.Pytester) -> None:
    result = sample.runpytest("-k", "hidden_spawn", *QUIET)
    result.assert_outcomes(passed=1)
