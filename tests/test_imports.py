"""The producer side runs without torch; an embedded run without Celery, kombu or the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import RedisServer, WorkerProcess, genq, rows, wait_for, write_prompts

PROFILE = "tiny-random"


# A Python in which torch and the model libraries cannot be imported, as on a submitting machine
# that never installed them: a meta path finder, installed by sitecustomize, refuses them.
NO_TORCH = """
import sys

BLOCKED = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (this machine has no torch)", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
"""


def no_torch_env(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_submit_status_collect_and_estimate_run_without_torch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The producer's commands on a machine without torch, against a real Redis and a real worker
    (which has torch): estimate, submit, status (one job and the list), collect."""
    from worker.model.tiny import ensure_model

    ensure_model()  # estimate reads the tiny model's files; building them the first time needs torch
    env = no_torch_env(tmp_path / "no-torch")
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "this machine has no torch" in probe.stderr, probe.stderr
    url = redis_server.url
    prompts = write_prompts(tmp_path / "in.jsonl", 6, max_new_tokens=3)

    estimate = json.loads(genq(url, "estimate", str(prompts), "--profile", PROFILE, "--json", **env).stdout)
    assert estimate["items"] == 6 and estimate["tokens"]["prompt"] > 0, estimate  # the tokenizer ran
    job = genq(url, "submit", str(prompts), "--profile", PROFILE, **env).stdout.strip()
    queued = json.loads(genq(url, "status", job, "--json", **env).stdout)
    assert queued["counts"]["total"] == 6 and queued["status"] == "queued", queued
    worker = WorkerProcess(url, tmp_path / "worker.log").start()
    try:

        def done() -> dict[str, Any] | None:
            state = json.loads(genq(url, "status", job, "--json", **env).stdout)
            return state if state["status"] == "completed" else None

        finished = wait_for(done, timeout=180, interval=1, what="the job to complete")
        assert finished["counts"]["succeeded"] == 6, finished
    finally:
        worker.stop()
    assert job in genq(url, "status", **env).stdout
    out = tmp_path / "out.jsonl"
    genq(url, "collect", job, "-o", str(out), **env)
    assert [r["id"] for r in rows(out)] == [f"p{i:04d}" for i in range(6)]


def test_embedded_run_imports_neither_celery_nor_kombu(tmp_path: Path) -> None:
    """`genq run FILE -o OUT` without GENQ_BROKER_URL completes with no Celery, kombu or Redis
    job store in the process (the layering makes it so; this watches it stay so)."""
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": f"fever {i}", "max_new_tokens": 3}) + "\n" for i in range(3)
        )
    )
    out = tmp_path / "out.jsonl"
    args = ["run", str(src), "-o", str(out), "--profile", "tiny-random"]
    code = (
        "import sys\n"
        "from producer.cli import cli\n"
        f"cli.main({args!r}, standalone_mode=False)\n"
        "banned = ('celery', 'kombu', 'worker.store', 'worker.queue')\n"
        "print('loaded:', sorted(m for m in sys.modules if m.startswith(banned)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded: []" in proc.stdout, proc.stdout
    assert len(out.read_text().splitlines()) == 3
