"""genq-worker check / prefetch / queues / facts, as a user runs them on a new machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def worker_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("mode", ["fp32", "nf4"])
def test_check_reports_the_loaded_model(mode: str) -> None:
    proc = worker_cli("check", "--profile", "tiny-random", "--mode", mode)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "profile",
        "mode",
        "device",
        "placement",
        "quantized_linear_layers",
        "adapter",
        "weights_bytes",
        "estimated_bytes",
        "load_seconds",
        "sample",
    ):
        assert key in report, key
    assert report["mode"] == mode and report["device"] == "cpu"
    assert report["placement"] == {"gpu": 0, "cpu": 2, "disk": 0}
    assert report["sample"]["completion_tokens"] > 0 and isinstance(report["sample"]["text"], str)
    assert abs(report["weights_bytes"] - report["estimated_bytes"]) / report["estimated_bytes"] < 0.05
    if mode == "fp32":
        assert report["adapter"] == "merged" and report["quantized_linear_layers"] == 0
    else:
        assert report["adapter"] == "unmerged" and report["quantized_linear_layers"] > 0


def test_check_fails_clearly_for_an_unknown_profile() -> None:
    proc = worker_cli("check", "--profile", "no-such-profile")
    assert proc.returncode == 2
    assert "unknown profile 'no-such-profile'" in proc.stderr and "Traceback" not in proc.stderr


def test_prefetch_reports_runtime_memory_per_mode() -> None:
    proc = worker_cli("prefetch", "--profile", "tiny-random")
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    mem = line["runtime_memory"]
    assert mem["fp32_cpu_bytes"] > mem["nf4_cpu_bytes"] > mem["nf4_gpu_bytes"] > 0


def test_prefetch_offline_names_the_repo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = worker_cli("prefetch", "--profile", "qwen2.5-7b-medical", "--dry-run", env=env)
    assert proc.returncode == 2
    assert "ttennant/qwen2.5-7b-medical-lora" in proc.stderr or "Qwen/Qwen2.5-7B-Instruct" in proc.stderr


def test_queues_and_facts() -> None:
    proc = worker_cli("queues", "--profile", "tiny-random", "--mode", "nf4")
    # each priority level in turn, high first; within a level the worker's own mode, then any
    assert proc.stdout.strip().split(",") == [
        "genq.tiny-random.nf4.high",
        "genq.tiny-random.any.high",
        "genq.tiny-random.nf4",
        "genq.tiny-random.any",
        "genq.tiny-random.nf4.low",
        "genq.tiny-random.any.low",
    ]
    facts = json.loads(worker_cli("facts").stdout)
    assert facts["device"] == "cpu" and facts["ram_total_bytes"] > 0 and facts["bnb_cpu"] is True
