"""Prometheus for real: a real Prometheus (the Debian package; scripts/test.sh installs it) scrapes
a real worker and the exporter under the shipped scrape config's job names, and every panel of the
Grafana dashboard returns data through its HTTP API during a job; the shipped alerting rules pass
``promtool check rules``, and each alert has a ``promtool test rules`` unit test
(tests/prometheus/*.test.yml) showing it fire when it should and stay silent otherwise.

Skipped, with the reason, where the prometheus or promtool binary is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import stop_process
from tests.helpers import REPO, RedisServer, WorkerProcess, env_for, free_port, genq, wait_for, write_prompts

CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
DASHBOARDS = REPO / "docker" / "grafana" / "dashboards"
UNIT_TESTS = REPO / "tests" / "prometheus"
PROFILE = "tiny-random"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus; scripts/test.sh does)")
    return path


def shipped_rule_files() -> list[Path]:
    """The rule files the shipped Prometheus config loads (relative to it)."""
    config = yaml.safe_load(CONFIG.read_text())
    return [CONFIG.parent / name for name in config.get("rule_files") or []]


def shipped_alerts() -> list[str]:
    return [
        rule["alert"]
        for path in shipped_rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def panel_queries() -> list[tuple[str, list[str]]]:
    """``(dashboard: panel title, [PromQL of each target])`` for every panel of every dashboard."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
            if exprs:
                out.append((f"{path.stem}: {panel['title']}", exprs))
    assert out, f"no dashboard panel with a query under {DASHBOARDS}"
    return out


# --- promtool: the shipped rules, and a unit test per alert -----------------------------------------


def test_shipped_rules_pass_promtool_check() -> None:
    promtool = binary("promtool")
    files = shipped_rule_files()
    if not files:
        pytest.skip(f"{CONFIG.relative_to(REPO)} loads no rule files")
    proc = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def unit_tests() -> dict[Path, dict[str, Any]]:
    return {path: yaml.safe_load(path.read_text()) for path in sorted(UNIT_TESTS.glob("*.test.yml"))}


def test_each_shipped_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    """Each shipped alert is evaluated by a promtool unit test at a time it must fire and at a time
    it must not; ``promtool test rules`` passes on them all."""
    promtool = binary("promtool")
    alerts = shipped_alerts()
    if not alerts:
        pytest.skip(f"{CONFIG.relative_to(REPO)} loads no alerting rules")
    shipped = {p.resolve() for p in shipped_rule_files()}
    fires: set[str] = set()
    silent: set[str] = set()
    runnable = []
    for path, doc in unit_tests().items():
        rules = {(path.parent / name).resolve() for name in doc.get("rule_files") or []}
        if not rules <= shipped:  # a test of rules this tree does not ship
            continue
        runnable.append(path)
        for case in doc.get("tests") or []:
            for check in case.get("alert_rule_test") or []:
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    missing = [a for a in alerts if a not in fires or a not in silent]
    assert not missing, (
        f"alerts without a unit test under {UNIT_TESTS.relative_to(REPO)} that shows them firing and "
        f"not firing: {missing}"
    )
    proc = subprocess.run(
        [promtool, "test", "rules", *(str(p.relative_to(REPO)) for p in runnable)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- a real Prometheus scraping a real worker and the exporter --------------------------------------


class Prometheus:
    """``prometheus`` on a free port with its own data folder, scraping every second."""

    def __init__(self, folder: Path, targets: dict[str, str]) -> None:
        self.folder = folder
        self.port = free_port()
        shipped = yaml.safe_load(CONFIG.read_text())
        jobs = [c["job_name"] for c in shipped["scrape_configs"]]
        assert set(targets) == set(jobs), (
            f"the shipped config scrapes {jobs}; this test starts {set(targets)}"
        )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in shipped_rule_files()],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [targets[job]]}]} for job in jobs
            ],
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, prometheus: str) -> None:
        self.proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "prometheus.log", "wb"),  # noqa: SIM115 - owned by the child
        )
        wait_for(self.ready, timeout=60, what="prometheus to be ready")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self.folder / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def targets_up(self) -> dict[str, float]:
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[Prometheus, str]]:
    prometheus = binary("prometheus")
    worker_port, exporter_port = free_port(), free_port()
    # each micro-batch sleeps, so the job is still running (backlog, ETA) when the panels are read
    worker = WorkerProcess(
        redis_server.url,
        tmp_path / "worker.log",
        name="prom-w1",
        env={"GENQ_FAULT_SLOW_MS": "300"},
        args=["--metrics-port", str(worker_port)],
    )
    exporter = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "metrics", "--port", str(exporter_port)],
        cwd=REPO,
        env=env_for(redis_server.url),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "exporter.log", "wb"),  # noqa: SIM115 - owned by the child
    )
    prom = Prometheus(
        tmp_path / "prometheus",
        {"genq-workers": f"127.0.0.1:{worker_port}", "genq-exporter": f"127.0.0.1:{exporter_port}"},
    )
    try:
        worker.start()
        prom.start(prometheus)
        yield prom, redis_server.url
    finally:
        prom.stop()
        stop_process(exporter)
        worker.stop()


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    stack: tuple[Prometheus, str], tmp_path: Path
) -> None:
    prom, url = stack
    wait_for(
        lambda: prom.targets_up() == {"genq-workers": 1.0, "genq-exporter": 1.0},
        timeout=60,
        what="both targets up",
    )
    prompts = write_prompts(tmp_path / "in.jsonl", 400, max_new_tokens=2)
    job = genq(url, "submit", str(prompts), "--profile", PROFILE, "--chunk-size", "4").stdout.strip()
    try:
        # some chunks done and scraped: durations, rates and the job's ETA exist
        wait_for(
            lambda: prom.query("sum(genq_chunk_seconds_count) >= 2") and prom.query("genq_job_eta_seconds"),
            timeout=180,
            interval=1,
            what="two chunks done and an ETA, as Prometheus scraped them",
        )
        time.sleep(3)  # a few more scrapes, for rate() over them
        cuda = bool(prom.query("genq_gpu_memory_bytes"))
        empty = []
        for panel, exprs in panel_queries():
            if "GPU memory" in panel and not cuda:
                continue  # a CUDA worker's series: a CPU worker exports none
            results = {expr: prom.query(expr) for expr in exprs}
            series = sum(len(r) for r in results.values())
            first = next((r[0]["value"][1] for r in results.values() if r), "-")
            print(f"{panel}: {series} series, e.g. {first}")
            if not series:
                empty.append(f"{panel}: {exprs}")
        assert not empty, "dashboard panels with no data from a real Prometheus:\n" + "\n".join(empty)
        status = json.loads(genq(url, "status", job, "--json").stdout)["status"]
        assert status == "in_progress", f"the job ended ({status}) before the panels were read"
    finally:
        genq(url, "cancel", job, check=False)
