"""Test tiers, decided per test at collection, so that a test added anywhere is classified too.

- ``unit``: no model, no Redis, no process of its own (``pytest -m unit``: run it while editing);
- ``model``: loads or builds a model in-process (the tiny one: ``load_model``, ``ensure_model``,
  transformers, peft), seconds each;
- ``redis``: starts a real redis-server (``RedisServer``, the ``redis_server`` fixture) or talks
  to one through the ``redis`` client;
- ``process``: starts other processes (``subprocess``, ``multiprocessing``, ``os.fork``,
  ``WorkerProcess``, the ``genq``/``run_genq`` helpers).

A test's tier is the highest one reached from its own code and from every fixture it uses,
following names through the test modules and helpers under ``tests/`` (the product code never
starts Redis, and what it may spawn is caught by the guard below).  A test may also declare its
tier with ``@pytest.mark.unit|redis|process``; a declared tier is never lowered.

Under ``-m unit`` each selected test runs guarded: starting a process, opening a Redis
connection or loading a model fails it, naming what it did, so a misclassified test is noticed
at once rather than making the fast tier slow.
"""

from __future__ import annotations

import _posixsubprocess
import importlib
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import pytest
import redis
import redis.connection

TIERS = ("unit", "model", "redis", "process")
_DESCRIPTIONS = {
    "unit": "no model, no Redis, no processes (set by tests/tiers.py)",
    "model": "loads or builds a model in this process (set by tests/tiers.py)",
    "redis": "starts or talks to a real redis-server (set by tests/tiers.py)",
    "process": "starts other processes: workers, genq CLIs, redis-server clusters (set by tests/tiers.py)",
}
_OS_SPAWNERS = frozenset({"fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "spawnv"})
_GUARD_KEY = pytest.StashKey[bool]()


# What puts a test in a tier, by qualified name (a module also stands for everything in it), so
# that classifying imports nothing heavy.
_SENTINELS = {
    "transformers": "model",
    "peft": "model",
    "worker.model.loading.load_model": "model",
    "worker.model.tiny.ensure_model": "model",
    "worker.model.tiny.ensure_adapter": "model",
    "worker.local.run.run_embedded": "model",
    "redis": "redis",
    "tests.cluster.RedisServer": "redis",
    "subprocess": "process",
    "multiprocessing": "process",
    "concurrent.futures.process": "process",
    "tests.cluster.WorkerProcess": "process",
}


def _qualname(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""


def _sentinel(qualname: str) -> int:
    """The tier a qualified name reaches by itself (0: none)."""
    parts = qualname.split(".")
    for n in range(len(parts), 0, -1):
        tier = _SENTINELS.get(".".join(parts[:n]))
        if tier:
            return TIERS.index(tier)
    return 0


_LIBRARIES = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
_PRODUCT = ("worker", "producer")


def _ours(obj: Any) -> bool:
    """Defined in tests, bench or another module that is neither the product (which never starts
    Redis, and whose spawning the guard catches) nor a library: where the helpers that start
    things live."""
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    if not isinstance(name, str) or name.split(".")[0] in _PRODUCT:
        return False
    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return bool(path) and not os.path.abspath(path).startswith(_LIBRARIES)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


class _Scan:
    """The highest tier reachable from some functions, memoised across a session."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}

    def tier(self, obj: Any) -> int:
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = 0  # cycles (a helper calling itself) add nothing
        level = self._tier(obj)
        self.memo[key] = level
        return level

    def _tier(self, obj: Any) -> int:
        level = _sentinel(_qualname(obj))
        if level or not _ours(obj):
            if isinstance(obj, types.FunctionType) and not _ours(obj):
                # pytest's or a library's function (hypothesis' TestCase): what it closes over
                return max([level] + [self.tier(c) for c in _cells(obj) if _ours(c)])
            return level
        if isinstance(obj, types.ModuleType):
            return 0  # reached through _through, name by name
        if isinstance(obj, type):
            return max([self.tier(v) for v in vars(obj).values()] + [0])
        if isinstance(obj, staticmethod | classmethod):
            return self.tier(obj.__func__)
        if isinstance(obj, property):
            return max(self.tier(f) for f in (obj.fget, obj.fset) if f is not None)
        fn = inspect.unwrap(obj) if callable(obj) else obj
        if not isinstance(fn, types.FunctionType):
            return 0
        found = [self.tier(c) for c in _cells(fn)]
        for code in _codes(fn.__code__):
            names = set(code.co_names)
            if "os" in names and names & _OS_SPAWNERS and fn.__globals__.get("os") is os:
                found.append(TIERS.index("process"))
            for name in names:
                if name in fn.__globals__:
                    value = fn.__globals__[name]
                    found.append(
                        self._through(value, names)
                        if isinstance(value, types.ModuleType)
                        else self.tier(value)
                    )
                elif name in sys.modules:  # ``import subprocess`` in the function
                    found.append(self._through(sys.modules[name], names))
                else:  # ``from worker.model.loading import load_model``, not imported yet
                    found += [_sentinel(name), *(_sentinel(f"{name}.{n}") for n in names)]
        return max([*found, 0])

    def _through(self, module: types.ModuleType, names: set[str], depth: int = 0) -> int:
        """What ``subprocess.run(...)``, ``queue.main(...)`` or ``from bench import step_profile``
        reach: the module itself, and the names of it (and of our submodules) the code reads."""
        found = [_sentinel(module.__name__)]
        for name in names:
            if not found[0] and _ours(module):
                value = getattr(module, name, None) or _submodule(module, name)
                if isinstance(value, types.ModuleType):
                    found.append(self._through(value, names, depth + 1) if depth < 3 else 0)
                elif value is not None:
                    found.append(self.tier(value))
            else:
                found.append(_sentinel(f"{module.__name__}.{name}"))
        return max(found)


def _cells(fn: types.FunctionType) -> list[Any]:
    """The values ``fn`` closes over (an empty cell has none)."""
    out = []
    for cell in fn.__closure__ or ():
        with suppress(ValueError):
            out.append(cell.cell_contents)
    return out


def _submodule(module: types.ModuleType, name: str) -> types.ModuleType | None:
    """``module.name`` when it is a submodule not imported yet (``from bench import x``)."""
    if not hasattr(module, "__path__"):
        return None
    try:
        return importlib.import_module(f"{module.__name__}.{name}")
    except ImportError:
        return None


def _declared(item: pytest.Item) -> int:
    return max([TIERS.index(m.name) for m in item.iter_markers() if m.name in TIERS] + [0])


def classify(item: pytest.Item, scan: _Scan) -> str:
    """The tier of ``item``: its own code, its class, its fixtures, and what it declares."""
    level = _declared(item)
    fn = getattr(item, "function", None)
    if fn is not None:
        level = max(level, scan.tier(fn))
    cls = getattr(item, "cls", None)
    for klass in inspect.getmro(cls) if cls is not None else ():
        level = max(level, scan.tier(klass))
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in info.name2fixturedefs.get(name, ()) if info is not None else ():
            level = max(level, scan.tier(fixturedef.func))
    return TIERS[level]


def pytest_configure(config: pytest.Config) -> None:
    for name in TIERS:
        config.addinivalue_line("markers", f"{name}: {_DESCRIPTIONS[name]}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Adds each item's tier marker before ``-m`` deselects (tryfirst: before pytest's own)."""
    scan = _Scan()
    for item in items:
        try:
            tier = classify(item, scan)
        except Exception as exc:  # a test this scan cannot read: the safe tier, said out loud
            tier = "process"
            item.warn(pytest.PytestWarning(f"tests/tiers.py could not classify it ({exc!r}): process"))
        if not any(m.name == tier for m in item.iter_markers()):
            item.add_marker(getattr(pytest.mark, tier))
    config.stash[_GUARD_KEY] = "unit" in (config.option.markexpr or "").split()


def unit_guard_on(config: pytest.Config) -> bool:
    """Whether this run is the unit tier (``-m unit``), whose tests may start nothing."""
    return config.stash.get(_GUARD_KEY, False)


def _refuse(what: str, nodeid: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(
            f"{nodeid} runs in the unit tier but {what}: mark it "
            "@pytest.mark.model|redis|process (or let tests/tiers.py see the helper that does it)",
            pytrace=False,
        )

    return refuse


@contextmanager
def _guarded(nodeid: str) -> Iterator[None]:
    with ExitStack() as stack:
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            mp.setattr(os, name, _refuse(f"called os.{name}", nodeid))
        spawned = _refuse("started a process", nodeid)
        mp.setattr(_posixsubprocess, "fork_exec", spawned)  # multiprocessing's spawn, forkserver
        mp.setattr(subprocess, "_fork_exec", spawned)  # subprocess' own binding of it
        mp.setattr(redis.connection.AbstractConnection, "connect", _refuse("connected to Redis", nodeid))
        mp.setattr("worker.model.loading.load_model", _refuse("loaded a model", nodeid))
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if not unit_guard_on(item.config) or item.get_closest_marker("unit") is None:
        return (yield)
    with _guarded(item.nodeid):
        return (yield)
