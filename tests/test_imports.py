"""The producer side and the schema never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "module",
    ["worker.core.schema", "worker.core.errors", "worker.core.settings", "worker.core.profiles", "producer"],
)
def test_no_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


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
