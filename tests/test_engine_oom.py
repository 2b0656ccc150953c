"""Out of memory: recognised however it is raised, the batch halved, the ceiling learnt and probed
upward again — on the real tiny model, with injected limits and with a real allocation failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker.core.errors import OutOfMemory
from worker.core.schema import GenParams, Item
from worker.core.settings import Settings
from worker.engine.faults import FaultyEngine
from worker.engine.memory import PROBE_AFTER, BatchCeiling, is_oom

REPO = Path(__file__).resolve().parent.parent


def items(n: int, start: int = 0) -> list[Item]:
    words = "the patient has a fever and a cough since monday".split()
    return [
        Item(
            index=i,
            id=f"m{i}",
            prompt=" ".join(words[: 1 + i % len(words)]),
            params=GenParams(max_new_tokens=2),
        )
        for i in range(start, start + n)
    ]


class Recording(FaultyEngine):
    """The engine as a worker with ``GENQ_FAULT_OOM_ABOVE`` runs it, noting each micro-batch's rows."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.tried: list[int] = []

    def run_batch(self, batch, rows, attempts, emit, should_stop=None):  # type: ignore[no-untyped-def]
        self.tried.append(rows)
        return super().run_batch(batch, rows, attempts, emit, should_stop)


def recording(loaded, oom_above: int | None) -> Recording:  # type: ignore[no-untyped-def]
    return Recording(loaded, max_batch_size=8, settings=Settings(fault_oom_above=oom_above), ignore_eos=True)


# --- recognising it ------------------------------------------------------------------------------


def test_every_kind_of_out_of_memory_is_recognised() -> None:
    with pytest.raises(RuntimeError) as real:  # torch's CPU allocator refusing a real request
        torch.empty(2**50, dtype=torch.uint8)
    assert "DefaultCPUAllocator: can't allocate memory" in str(real.value)
    assert is_oom(real.value)
    assert is_oom(MemoryError()) and is_oom(OutOfMemory("injected"))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))


# --- the rule, on its own ------------------------------------------------------------------------


def test_ceiling_halves_then_probes_upward_after_clean_batches() -> None:
    memory = BatchCeiling()
    assert memory.limit(8) == 8
    assert memory.failed(8) and memory.limit(8) == 4
    assert memory.failed(4) and memory.limit(8) == 2
    assert not memory.failed(1)  # one row has nothing to halve
    for _ in range(PROBE_AFTER - 1):
        assert memory.succeeded(2, 8) is None
    assert memory.succeeded(1, 8) is None  # a batch the ceiling did not bind says nothing
    assert memory.succeeded(2, 8) == 4 and memory.limit(8) == 4  # the probe
    for _ in range(PROBE_AFTER - 1):
        memory.succeeded(4, 8)
    assert memory.succeeded(4, 8) == 0 and memory.limit(8) == 8 and memory.ceiling is None  # lifted


def test_a_failed_probe_waits_twice_as_long() -> None:
    memory = BatchCeiling()
    memory.failed(4)
    waits = []
    for _ in range(3):
        clean = 0
        while memory.succeeded(2, 8) is None:
            clean += 1
        waits.append(clean + 1)  # clean batches at 2 before the probe to 4
        assert memory.limit(8) == 4
        assert memory.failed(4) and memory.limit(8) == 2  # the probe fails
    assert waits == [PROBE_AFTER, 2 * PROBE_AFTER, 4 * PROBE_AFTER]


# --- in the engine -------------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_8_4_2(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = recording(loaded_fp32, oom_above=2)
    results = engine.generate(items(16))
    assert all(r.ok for r in results)
    assert engine.tried == [8, 4, 2]  # 8 fails, 4 fails, 2 runs the 16 items
    assert engine.oom_ceiling == 2 and engine.batch_limit() == 2
    clean = recording(loaded_fp32, oom_above=None)
    assert [r.text for r in results] == [r.text for r in clean.generate(items(16))]


def test_the_ceiling_is_probed_upward_when_memory_frees(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = recording(loaded_fp32, oom_above=2)
    engine.generate(items(8))  # learns 2: one clean micro-batch at 2
    engine.settings = Settings()  # memory frees up
    for n in range(2 * PROBE_AFTER):
        engine.generate(items(8, start=100 + 8 * n))  # one micro-batch per call
    assert engine.tried == [8, 4, 2] + [2] * (PROBE_AFTER - 1) + [4] * PROBE_AFTER + [8]
    assert engine.oom_ceiling is None and engine.batch_limit() == 8


def test_a_probe_into_a_real_limit_backs_off(loaded_fp32) -> None:  # type: ignore[no-untyped-def]
    engine = recording(loaded_fp32, oom_above=2)
    calls = 1 + PROBE_AFTER + 2 * PROBE_AFTER
    for n in range(calls):
        results = engine.generate(items(8, start=8 * n))
        assert all(r.ok for r in results)
    first = [8, 4, 2] + [2] * (PROBE_AFTER - 1)  # learnt, then clean at 2
    probe1 = [4, 2] + [2] * (2 * PROBE_AFTER - 1)  # the probe fails; twice as long at 2
    probe2 = [4, 2]  # fails again
    assert engine.tried == first + probe1 + probe2
    assert engine.oom_ceiling == 2 and engine.memory.wait == 4 * PROBE_AFTER


def test_a_real_cpu_allocation_failure_halves_the_batch(genq_home: Path) -> None:
    """A process of its own under RLIMIT_AS (tests/oom_child.py): the KV cache of 8 and then 4
    rows cannot be allocated; the engine halves to 2 and every item completes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENQ_LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.oom_child", str(genq_home)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(b["rows"], b["new_limit"]) for b in report["backoff"]] == [(8, 4), (4, 2)]
    assert all("DefaultCPUAllocator: can't allocate memory" in b["error"] for b in report["backoff"])
    assert report["ceiling"] == 2
    assert report["status"] == ["ok"] * 8 and report["same_text_as_alone"]
    assert max(report["completion_tokens"]) < 64  # the stop strings ended the rows early
