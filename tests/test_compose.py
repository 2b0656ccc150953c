"""compose.yaml and docker/worker.Dockerfile, checked without a Docker engine.

The compose file is read with PyYAML, ``${VAR:-default}`` is resolved the way Compose resolves it,
and every worker command is parsed by the real ``genq-worker`` click CLI (parsed only: nothing is
started), so a renamed flag, a missing required option or an unknown profile fails here rather
than in a restart loop on a GPU box.  Each check is a function that raises ``AssertionError``; the
``test_check_rejects_*`` tests feed it a broken copy of the compose file and expect that.

Where ``docker compose`` (or the standalone ``docker-compose``) is installed, ``config -q`` runs too;
it needs no engine.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from worker.core.settings import ENV_PREFIX, Settings
from worker.main import cli

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
HF_CACHE = "/root/.cache/huggingface"
GENQ_VAR = re.compile(r"\bGENQ_[A-Z0-9_]+\b")
# Names that start with GENQ_ but are not worker settings.
NOT_SETTINGS = {"GENQ_TORCH_VERSION", "GENQ_TEST_HOME"}

Compose = dict[str, Any]


# --- reading: interpolation, Dockerfile, argv ------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``,
    ``${VAR:?err}``, ``${VAR?err}``, ``${VAR:+alt}``, ``${VAR+alt}``."""

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["plain"]
        op, arg = m["op"] or "", m["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            missing = unset_or_empty if op == ":-" else value is None
            return arg if missing else str(value)
        if op in (":?", "?"):
            missing = unset_or_empty if op == ":?" else value is None
            if missing:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return str(value)
        if op in (":+", "+"):
            present = not unset_or_empty if op == ":+" else value is not None
            return arg if present else ""
        return value or ""

    return _VAR.sub(one, text)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def raw_compose() -> Compose:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def load_compose(env: Mapping[str, str] | None = None) -> Compose:
    """compose.yaml as Compose sees it with ``env`` (default: nothing set, so defaults apply)."""
    return resolve(raw_compose(), env or {})


def service(compose: Compose, name: str) -> dict[str, Any]:
    services = compose.get("services") or {}
    assert name in services, f"compose.yaml has no service {name!r} (has {sorted(services)})"
    svc = services[name]
    assert isinstance(svc, dict), f"service {name} must be a mapping"
    return svc


def environment(svc: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict; ``None`` = passed through from the host."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str | None] = {}
        for entry in env:
            key, sep, value = str(entry).partition("=")
            out[key] = value if sep else None
        return out
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def dockerfile_path(svc: Mapping[str, Any]) -> Path | None:
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return REPO / build / "Dockerfile"
    return REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and logical):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            yield word.upper(), rest.strip()
        logical = ""


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"{path.name}: use ENV KEY=VALUE, not the legacy 'ENV KEY VALUE' ({rest})"
                env[key] = value
    return env


def dockerfile_entrypoint(path: Path) -> list[str]:
    entry: list[str] = []
    for word, rest in dockerfile_instructions(path):
        if word == "ENTRYPOINT":
            entry = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
    return entry


def argv(svc: Mapping[str, Any]) -> list[str]:
    """What the container runs: the entrypoint (the service's, else its Dockerfile's) + command."""
    entry = svc.get("entrypoint")
    if entry is None:
        path = dockerfile_path(svc)
        entry = dockerfile_entrypoint(path) if path and path.is_file() else []
    command = svc.get("command") or []
    return _words(entry) + _words(command)


def _words(value: str | list[Any]) -> list[str]:
    """A compose string (shell-split, as Compose does) or list as an argv list."""
    return shlex.split(value) if isinstance(value, str) else [str(x) for x in value]


def worker_services(compose: Compose) -> list[str]:
    """Services that run genq-worker: built from a Dockerfile here, or running genq-worker."""
    names = []
    for name, svc in (compose.get("services") or {}).items():
        args = argv(svc)
        if svc.get("build") is not None or (args and Path(args[0]).name == "genq-worker"):
            names.append(name)
    return names


def parse_worker_args(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``genq-worker ARGS`` with the real click CLI without running anything.  Unknown
    commands or flags, bad choices and missing required options raise AssertionError."""
    assert args, "empty command"
    assert Path(args[0]).name == "genq-worker", f"runs {args[0]!r}, not genq-worker: {args}"
    rest = args[1:]
    try:
        ctx = cli.make_context("genq-worker", list(rest))
        name, cmd, sub_args = cli.resolve_command(ctx, list(rest))
        assert cmd is not None and name is not None, f"no command in {args}"
        sub = cmd.make_context(name, list(sub_args), parent=ctx)
    except click.exceptions.Exit:
        raise AssertionError(f"`{shlex.join(args)}` only prints help") from None
    except click.ClickException as exc:
        raise AssertionError(
            f"`{shlex.join(args)}` is rejected by genq-worker: {exc.format_message()}"
        ) from None
    return name, dict(sub.params)


def duration_seconds(text: str) -> float:
    """Compose durations: ``90s``, ``5m``, ``1m30s``, ``1h``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def named_volumes(compose: Compose, svc: Mapping[str, Any]) -> dict[str, str]:
    """target → source of the service's mounts; named sources must be declared at the top level."""
    out: dict[str, str] = {}
    declared = compose.get("volumes") or {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str):
            source, _, rest = vol.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = str(vol.get("source", "")), str(vol.get("target", ""))
        if source and not source.startswith((".", "/", "~")):
            assert source in declared, f"volume {source!r} is not declared under top-level volumes:"
        out[target] = source
    return out


# --- checks: each raises AssertionError naming what is wrong ---------------------------------------


def check_services_exist(compose: Compose) -> None:
    for name in ("redis", "worker-gpu", "worker-cpu", "flower"):
        service(compose, name)


def check_redis(compose: Compose) -> None:
    redis = service(compose, "redis")
    assert str(redis.get("image", "")).startswith("redis:7"), "redis must use the redis:7 image"
    cmd = argv(redis)
    pairs = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert pairs.get("--appendonly") == "yes", f"redis needs --appendonly yes: {cmd}"
    assert pairs.get("--appendfsync") in ("everysec", "always"), f"redis needs --appendfsync everysec: {cmd}"
    assert pairs.get("--maxmemory-policy") == "noeviction", (
        f"redis needs --maxmemory-policy noeviction: {cmd}"
    )
    test = (redis.get("healthcheck") or {}).get("test") or []
    words = shlex.split(test) if isinstance(test, str) else [str(t) for t in test]
    assert "redis-cli" in words and "ping" in words, f"redis needs a `redis-cli ping` healthcheck: {test}"
    assert "/data" in named_volumes(compose, redis), "redis needs a volume on /data for its append-only file"


def check_broker(compose: Compose, name: str) -> None:
    svc = service(compose, name)
    url = environment(svc).get("GENQ_BROKER_URL")
    assert url, f"{name}: GENQ_BROKER_URL is not set"
    parts = urlsplit(url)
    assert parts.scheme in ("redis", "rediss"), f"{name}: GENQ_BROKER_URL {url!r} is not a Redis URL"
    assert parts.hostname in (compose.get("services") or {}), (
        f"{name}: GENQ_BROKER_URL host {parts.hostname!r} is not a compose service"
    )
    depends = svc.get("depends_on") or {}
    condition = depends.get(parts.hostname, {}).get("condition") if isinstance(depends, dict) else None
    assert condition == "service_healthy", (
        f"{name}: depends_on {parts.hostname} must wait for service_healthy"
    )


def check_worker_commands(compose: Compose) -> None:
    """Every genq-worker service's command parses, and names a profile that exists in configs/."""
    workers = worker_services(compose)
    assert workers, "no genq-worker services found"
    configs = Settings.from_env({}, configs_dir=REPO / "configs")
    from worker.core.profiles import load_profile

    for name in workers:
        cmd_name, params = parse_worker_args(argv(service(compose, name)))
        profile = params.get("profile")
        if profile is not None:
            assert (REPO / "configs" / f"{profile}.yaml").is_file(), (
                f"{name}: profile {profile!r} is not in configs/"
            )
            load_profile(profile, configs)  # and it is a valid profile
        if cmd_name == "start":
            check_broker(compose, name)


def worker_mode(compose: Compose, name: str) -> str:
    cmd_name, params = parse_worker_args(argv(service(compose, name)))
    assert cmd_name == "start", f"{name} must run `genq-worker start`, not {cmd_name!r}"
    return str(params["mode"])


def check_worker_gpu(compose: Compose) -> None:
    gpu = service(compose, "worker-gpu")
    assert worker_mode(compose, "worker-gpu") == "nf4", "worker-gpu must run --mode nf4"
    devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    assert devices, "worker-gpu needs deploy.resources.reservations.devices"
    nvidia = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    assert nvidia, f"worker-gpu needs an nvidia device with capabilities [gpu]: {devices}"
    for dev in nvidia:
        count = dev.get("count")
        assert count == "all" or (isinstance(count, int) and count >= 1) or dev.get("device_ids"), (
            f"worker-gpu device count must be 'all' or >= 1: {dev}"
        )
    mounts = named_volumes(compose, gpu)
    assert HF_CACHE in mounts, f"worker-gpu needs the Hugging Face cache volume on {HF_CACHE}"
    env = environment(gpu)
    offload = env.get("GENQ_OFFLOAD_FOLDER")
    assert offload and offload in mounts, "worker-gpu needs GENQ_OFFLOAD_FOLDER on a volume"
    check_hf_token(compose, "worker-gpu")


def check_hf_token(compose: Compose, name: str) -> None:
    """HF_TOKEN is passed through from the host (no value, or ${HF_TOKEN...}); never written here."""
    raw_env = environment(service(raw_compose_or(compose), name))
    assert "HF_TOKEN" in raw_env, f"{name}: HF_TOKEN is not passed through"
    value = raw_env["HF_TOKEN"]
    assert value is None or re.fullmatch(r"\$\{?HF_TOKEN(?:[:?\-+][^}]*)?\}?", value), (
        f"{name}: HF_TOKEN must come from the host environment, not be written in compose.yaml"
    )


def raw_compose_or(compose: Compose) -> Compose:
    """The un-interpolated file when ``compose`` is the resolved file; mutated copies as they are."""
    return compose.get("_raw", compose)


def check_worker_cpu(compose: Compose) -> None:
    cpu = service(compose, "worker-cpu")
    assert worker_mode(compose, "worker-cpu") == "fp32", "worker-cpu must run --mode fp32"
    # --scale worker-cpu=N: nothing may be fixed per container
    for key in ("container_name", "ports", "hostname"):
        assert not cpu.get(key), f"worker-cpu sets {key}: it could not be scaled to several replicas"
    _, params = parse_worker_args(argv(cpu))
    assert not params.get("name"), "worker-cpu sets --name: replicas would share one worker name"
    assert HF_CACHE in named_volumes(compose, cpu), f"worker-cpu needs the Hugging Face cache on {HF_CACHE}"


def check_worker_lifecycle(compose: Compose) -> None:
    for name in ("worker-gpu", "worker-cpu"):
        svc = service(compose, name)
        assert svc.get("restart") == "unless-stopped", f"{name}: restart must be unless-stopped"
        grace = svc.get("stop_grace_period")
        assert grace and duration_seconds(grace) >= 60, (
            f"{name}: stop_grace_period {grace!r} is too short to finish a micro-batch"
        )


def check_flower(compose: Compose) -> None:
    flower = service(compose, "flower")
    assert "monitoring" in (flower.get("profiles") or []), "flower must be under profiles: [monitoring]"
    cmd = argv(flower)
    assert "flower" in cmd and "--port=5555" in cmd, f"flower must run `celery ... flower --port=5555`: {cmd}"
    broker = next((a.split("=", 1)[1] for a in cmd if a.startswith("--broker=")), "")
    assert urlsplit(broker).hostname in (compose.get("services") or {}), f"flower's broker {broker!r}"
    ports = [str(p) for p in flower.get("ports") or []]
    assert any(p.split(":")[-1].split("/")[0] == "5555" for p in ports), f"flower must publish 5555: {ports}"


def compose_env_names(node: Any) -> set[str]:
    """GENQ_* names used anywhere in the (parsed) compose file: keys, values, ${...}."""
    found: set[str] = set()
    if isinstance(node, str):
        found |= set(GENQ_VAR.findall(node))
    elif isinstance(node, list):
        for v in node:
            found |= compose_env_names(v)
    elif isinstance(node, dict):
        for k, v in node.items():
            found |= compose_env_names(str(k)) | compose_env_names(v)
    return found


def check_genq_names(names: set[str], where: str) -> None:
    unknown = sorted(
        n for n in names - NOT_SETTINGS if n[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    )
    assert not unknown, (
        f"{where} names GENQ_* variables that worker/core/settings.py does not read: {unknown}"
    )


def check_settings(compose: Compose) -> None:
    """Every GENQ_* name is a Settings field, and each worker's environment (the Dockerfile's ENV
    plus the service's) is accepted by Settings.from_env."""
    check_genq_names(compose_env_names({k: v for k, v in compose.items() if k != "_raw"}), "compose.yaml")
    for name in worker_services(compose):
        svc = service(compose, name)
        path = dockerfile_path(svc)
        env = dockerfile_env(path) if path and path.is_file() else {}
        env.update({k: v for k, v in environment(svc).items() if v is not None})
        try:
            Settings.from_env(env)
        except Exception as exc:
            raise AssertionError(f"{name}: its environment is rejected: {exc}") from None


def check_dockerfiles(compose: Compose) -> None:
    for name, svc in (compose.get("services") or {}).items():
        path = dockerfile_path(svc)
        if path is None:
            continue
        assert path.is_file(), f"{name}: {path.relative_to(REPO)} does not exist"
        if name in worker_services(compose):
            env = dockerfile_env(path)
            assert env.get("HF_HOME") == HF_CACHE, (
                f"{path.name}: HF_HOME must be {HF_CACHE} (the mounted cache)"
            )
            assert "GENQ_HOME" in env, f"{path.name}: GENQ_HOME is not set"
            assert dockerfile_entrypoint(path) == ["genq-worker"], (
                f"{path.name}: ENTRYPOINT must be genq-worker"
            )
            users = [rest for word, rest in dockerfile_instructions(path) if word == "USER"]
            assert users and users[-1] not in ("root", "0"), f"{path.name}: the worker must not run as root"


# --- monitoring: Prometheus, Grafana, the exporter, the dashboard ----------------------------------

PROMQL_NAME = re.compile(r"\bgenq_[a-z0-9_]+\b")
MONITORING_YAML = [
    REPO / "docker" / "prometheus" / "prometheus.yml",
    REPO / "docker" / "grafana" / "provisioning" / "datasources" / "genq.yml",
    REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "genq.yml",
]


def exported_names() -> set[str]:
    """Every series genq exposes: the worker's metrics (as registered in code) and the exporter's."""
    from worker.queue import exporter, metrics

    return metrics.sample_names() | exporter.sample_names()


def bind_mounts(svc: Mapping[str, Any]) -> dict[str, Path]:
    """target → file or folder in the repository, for the service's ``./`` bind mounts."""
    out: dict[str, Path] = {}
    for vol in svc.get("volumes") or []:
        if isinstance(vol, str) and vol.startswith("./"):
            source, target = vol.split(":")[:2]
            out[target] = REPO / source
    return out


def mounted(svc: Mapping[str, Any], path: str) -> Path:
    """The repository file behind ``path`` inside the container (a mount of it or of a folder above)."""
    for target, source in sorted(bind_mounts(svc).items(), key=lambda kv: -len(kv[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            found = source / path[len(target) :].lstrip("/")
            assert found.exists(), f"{path} is mounted from {found.relative_to(REPO)}, which does not exist"
            return found
    raise AssertionError(f"{path} is not mounted from the repository: {svc.get('volumes')}")


def metrics_ports(compose: Compose) -> dict[str, int]:
    """service → the port its metrics are served on: workers' --metrics-port, the exporter's --port."""
    from producer.cli import cli as genq_cli

    ports: dict[str, int] = {}
    for name in worker_services(compose):
        cmd_name, params = parse_worker_args(argv(service(compose, name)))
        if cmd_name == "start" and params.get("metrics_port"):
            ports[name] = int(params["metrics_port"])
    for name, svc in (compose.get("services") or {}).items():
        args = argv(svc)
        if args[:2] == ["genq", "metrics"]:
            sub = genq_cli.commands["metrics"].make_context("metrics", args[2:])
            ports[name] = int(sub.params["port"])
    return ports


def check_prometheus(compose: Compose) -> None:
    """Prometheus reads the repository's config, and it scrapes every worker and the exporter on
    the port each serves metrics on."""
    prom = service(compose, "prometheus")
    assert "monitoring" in (prom.get("profiles") or []), "prometheus must be under profiles: [monitoring]"
    flag = next((a for a in argv(prom) if a.startswith("--config.file=")), None)
    assert flag, "prometheus must be started with --config.file="
    config = yaml.safe_load(mounted(prom, flag.split("=", 1)[1]).read_text(encoding="utf-8"))
    ports = metrics_ports(compose)
    starts = [n for n in worker_services(compose) if worker_command(compose, n) == "start"]
    assert set(starts) <= set(ports), f"workers without --metrics-port: {sorted(set(starts) - set(ports))}"
    scraped: set[str] = set()
    for job in config.get("scrape_configs") or []:
        for sd in job.get("dns_sd_configs") or []:
            for name in sd.get("names") or []:
                assert name in ports, f"prometheus scrapes {name!r}, which serves no metrics"
                assert int(sd["port"]) == ports[name], f"prometheus scrapes {name} on {sd['port']}"
                scraped.add(name)
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = str(target).partition(":")
                assert host in ports and int(port) == ports[host], f"prometheus target {target!r}"
                scraped.add(host)
    assert scraped == set(ports), f"not scraped: {sorted(set(ports) - scraped)}"


def worker_command(compose: Compose, name: str) -> str | None:
    return parse_worker_args(argv(service(compose, name)))[0]


def check_dashboard(dashboard: dict[str, Any], datasource_uids: set[str]) -> None:
    """Every panel queries a provisioned datasource and names only metrics genq exports."""
    known = exported_names()
    panels = dashboard.get("panels") or []
    assert dashboard.get("uid") and dashboard.get("title") and panels, "dashboard needs uid, title, panels"
    ids = [p.get("id") for p in panels]
    assert len(set(ids)) == len(ids), f"panel ids repeat: {ids}"
    for panel in panels:
        title = panel.get("title")
        assert title and panel.get("gridPos"), f"panel {panel.get('id')} needs a title and a gridPos"
        targets = panel.get("targets") or []
        assert targets, f"panel {title!r} has no query"
        for target in targets:
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid")
            assert uid in datasource_uids, f"panel {title!r} uses datasource {uid!r}, not provisioned"
            names = set(PROMQL_NAME.findall(str(target.get("expr", ""))))
            assert names, f"panel {title!r}: {target.get('expr')!r} names no genq metric"
            unknown = sorted(names - known)
            assert not unknown, f"panel {title!r} queries metrics genq does not export: {unknown}"


def check_grafana(compose: Compose) -> None:
    """Grafana's provisioning comes from the repository: a datasource pointing at the prometheus
    service, a provider whose folder holds the dashboards, and each dashboard passes
    :func:`check_dashboard`."""
    graf = service(compose, "grafana")
    assert "monitoring" in (graf.get("profiles") or []), "grafana must be under profiles: [monitoring]"
    sources = yaml.safe_load(
        mounted(graf, "/etc/grafana/provisioning/datasources/genq.yml").read_text(encoding="utf-8")
    )
    uids = set()
    for ds in sources.get("datasources") or []:
        assert urlsplit(ds["url"]).hostname in (compose.get("services") or {}), f"datasource url {ds['url']}"
        uids.add(ds["uid"])
    providers = yaml.safe_load(
        mounted(graf, "/etc/grafana/provisioning/dashboards/genq.yml").read_text(encoding="utf-8")
    )
    dashboards = []
    for provider in providers.get("providers") or []:
        folder = mounted(graf, provider["options"]["path"])
        dashboards += sorted(folder.glob("*.json"))
    assert dashboards, "the dashboard provider's folder holds no dashboard JSON"
    for path in dashboards:
        check_dashboard(json.loads(path.read_text(encoding="utf-8")), uids)


ALL_CHECKS: list[Callable[[Compose], None]] = [
    check_services_exist,
    check_redis,
    check_worker_commands,
    check_worker_gpu,
    check_worker_cpu,
    check_worker_lifecycle,
    check_flower,
    check_settings,
    check_dockerfiles,
    check_prometheus,
    check_grafana,
]


@pytest.fixture
def compose() -> Compose:
    data = load_compose()
    data["_raw"] = raw_compose()  # for checks about what is written, not what it resolves to
    return data


# --- the real files pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_compose_passes(compose: Compose, check: Callable[[Compose], None]) -> None:
    check(compose)


def test_worker_commands_use_the_profile_from_the_environment() -> None:
    resolved = load_compose({"GENQ_PROFILE": "tiny-random"})
    for name in ("worker-gpu", "worker-cpu"):
        _, params = parse_worker_args(argv(service(resolved, name)))
        assert params["profile"] == "tiny-random"
    check_worker_commands(resolved)


def test_every_genq_name_in_the_files_is_a_setting() -> None:
    """Comments included: a newcomer copying a variable name from a comment must get a real one."""
    check_genq_names(set(GENQ_VAR.findall(COMPOSE.read_text(encoding="utf-8"))), "compose.yaml")
    check_genq_names(
        set(GENQ_VAR.findall((REPO / "docker" / "worker.Dockerfile").read_text(encoding="utf-8"))),
        "docker/worker.Dockerfile",
    )


@pytest.mark.skipif(not OPERATIONS.is_file(), reason="docs/OPERATIONS.md not written yet")
def test_operations_doc_lists_exactly_the_settings() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    check_genq_names(set(GENQ_VAR.findall(text)), "docs/OPERATIONS.md")
    for field in Settings.model_fields:
        var = "HF_TOKEN" if field == "hf_token" else ENV_PREFIX + field.upper()
        assert f"`{var}`" in text, f"docs/OPERATIONS.md does not document {var}"


def test_dockerignore_keeps_secrets_out() -> None:
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for needed in (".env", ".git", ".venv", ".genq"):
        assert needed in lines, f".dockerignore must exclude {needed}"
    for needed_by_build in ("worker", "producer", "configs", "pyproject.toml", "README.md"):
        assert needed_by_build not in lines, (
            f".dockerignore excludes {needed_by_build}, which the build copies"
        )


def _compose_cli() -> list[str] | None:
    candidates = [["docker", "compose"], ["docker-compose"]]
    for base in candidates:
        if not shutil.which(base[0]):
            continue
        try:
            probe = subprocess.run(
                [*base, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return base
    return None


PROFILES = ["--profile", "monitoring", "--profile", "check"]


def _compose_config(base: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*base, "-f", str(path), "--project-directory", str(REPO), *PROFILES, "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """The real Compose parser (it needs no Docker engine).  Skipped where it is not installed."""
    base = _compose_cli()
    if base is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    proc = _compose_config(base, COMPOSE)
    assert proc.returncode == 0, f"{shlex.join(base)} config -q failed:\n{proc.stderr[-2000:]}"
    # and it does reject a broken file (a misspelt key), so the pass above means something
    broken = COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:", "stop_grace_periods:", 1)
    assert broken != COMPOSE.read_text(encoding="utf-8")
    (tmp_path / "compose.yaml").write_text(broken, encoding="utf-8")
    assert _compose_config(base, tmp_path / "compose.yaml").returncode != 0


# --- each check fails on a broken copy -------------------------------------------------------------


def _set_command(name: str, command: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        c["services"][name]["command"] = command

    return mutate


def _set(path: str, value: Any) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def _env(name: str, key: str, value: str | None) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        for data in (c, c["_raw"]):
            data["services"][name].setdefault("environment", {})[key] = value

    return mutate


def _drop_env(name: str, key: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        for data in (c, c["_raw"]):
            data["services"][name]["environment"].pop(key, None)

    return mutate


def _drop_volume(name: str, target: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        vols = c["services"][name]["volumes"]
        c["services"][name]["volumes"] = [v for v in vols if str(v).split(":")[1:2] != [target]]

    return mutate


def _redis_arg(old: str, new: str) -> Callable[[Compose], None]:
    def mutate(c: Compose) -> None:
        c["services"]["redis"]["command"] = [
            new if a == old else a for a in c["services"]["redis"]["command"]
        ]

    return mutate


GPU = "services.worker-gpu"
DEVICES = f"{GPU}.deploy.resources.reservations.devices"

BROKEN: dict[str, tuple[Callable[[Compose], None], Callable[[Compose], None]]] = {
    # command-line parsing by the real CLI
    "unknown-flag": (
        _set_command("worker-gpu", "start --profile tiny-random --mode nf4 --gpus 2"),
        check_worker_commands,
    ),
    "bad-mode-choice": (
        _set_command("worker-gpu", "start --profile tiny-random --mode int8"),
        check_worker_commands,
    ),
    "missing-profile": (_set_command("worker-cpu", "start --mode fp32"), check_worker_commands),
    "unknown-subcommand": (_set_command("worker-cpu", "serve --profile tiny-random"), check_worker_commands),
    "entrypoint-twice": (
        _set_command("worker-cpu", "genq-worker start --profile tiny-random --mode fp32"),
        check_worker_commands,
    ),
    "help-only": (_set_command("worker-cpu", "start --help"), check_worker_commands),
    "unknown-profile": (
        _set_command("worker-gpu", "start --profile no-such-profile --mode nf4"),
        check_worker_commands,
    ),
    "concurrency-zero": (
        _set_command("worker-cpu", "start --profile tiny-random --mode fp32 --concurrency 0"),
        check_worker_commands,
    ),
    "broker-not-a-service": (
        _env("worker-gpu", "GENQ_BROKER_URL", "redis://127.0.0.1:6379/0"),
        check_worker_commands,
    ),
    "no-healthy-wait": (_delete(f"{GPU}.depends_on"), check_worker_commands),
    # redis
    "no-appendonly": (_redis_arg("yes", "no"), check_redis),
    "evicting-redis": (_redis_arg("noeviction", "allkeys-lru"), check_redis),
    "no-healthcheck": (_delete("services.redis.healthcheck"), check_redis),
    "redis-without-volume": (_delete("services.redis.volumes"), check_redis),
    "undeclared-volume": (_delete("volumes.redis-data"), check_redis),
    # GPU worker
    "gpu-mode-fp32": (
        _set_command("worker-gpu", "start --profile tiny-random --mode fp32"),
        check_worker_gpu,
    ),
    "gpu-mode-auto": (_set_command("worker-gpu", "start --profile tiny-random"), check_worker_gpu),
    "no-gpu-reservation": (_delete(f"{GPU}.deploy"), check_worker_gpu),
    "amd-driver": (
        _set(DEVICES, [{"driver": "amdgpu", "count": 1, "capabilities": ["gpu"]}]),
        check_worker_gpu,
    ),
    "zero-gpus": (
        _set(DEVICES, [{"driver": "nvidia", "count": 0, "capabilities": ["gpu"]}]),
        check_worker_gpu,
    ),
    "no-hf-cache": (_drop_volume("worker-gpu", HF_CACHE), check_worker_gpu),
    "no-offload-volume": (_drop_volume("worker-gpu", "/var/lib/genq/offload"), check_worker_gpu),
    "no-hf-token": (_drop_env("worker-gpu", "HF_TOKEN"), check_worker_gpu),
    "hf-token-written-in": (_env("worker-gpu", "HF_TOKEN", "hf_abcdefghijklmnop"), check_worker_gpu),
    # CPU worker
    "cpu-mode-nf4": (_set_command("worker-cpu", "start --profile tiny-random --mode nf4"), check_worker_cpu),
    "cpu-container-name": (_set("services.worker-cpu.container_name", "genq-cpu"), check_worker_cpu),
    "cpu-fixed-port": (_set("services.worker-cpu.ports", ["8000:8000"]), check_worker_cpu),
    "cpu-fixed-name": (
        _set_command("worker-cpu", "start --profile tiny-random --mode fp32 --name cpu1"),
        check_worker_cpu,
    ),
    "cpu-no-hf-cache": (_drop_volume("worker-cpu", HF_CACHE), check_worker_cpu),
    # lifecycle
    "short-grace": (_set(f"{GPU}.stop_grace_period", "10s"), check_worker_lifecycle),
    "no-grace": (_delete("services.worker-cpu.stop_grace_period"), check_worker_lifecycle),
    "restart-off": (_set(f"{GPU}.restart", "no"), check_worker_lifecycle),
    # flower
    "flower-always-on": (_delete("services.flower.profiles"), check_flower),
    "flower-other-port": (
        _set("services.flower.command", "celery --broker=redis://redis:6379/0 flower"),
        check_flower,
    ),
    "flower-no-ports": (_delete("services.flower.ports"), check_flower),
    "no-flower": (_delete("services.flower"), check_services_exist),
    # settings
    "unknown-setting": (_env("worker-cpu", "GENQ_BATCH_SIZE", "8"), check_settings),
    "bad-setting-value": (_env("worker-gpu", "GENQ_VISIBILITY_TIMEOUT", "soon"), check_settings),
    "bad-log-format": (_env("worker-cpu", "GENQ_LOG_FORMAT", "xml"), check_settings),
    # monitoring
    "worker-without-metrics": (
        _set_command("worker-cpu", "start --profile tiny-random --mode fp32"),
        check_prometheus,
    ),
    "metrics-on-another-port": (
        _set_command("worker-gpu", "start --profile tiny-random --mode nf4 --metrics-port 9401"),
        check_prometheus,
    ),
    "exporter-on-another-port": (_set("services.metrics.command", "metrics --port 9999"), check_prometheus),
    "prometheus-config-not-mounted": (_delete("services.prometheus.volumes"), check_prometheus),
    "grafana-without-dashboards": (
        _set("services.grafana.volumes", ["./docker/grafana/provisioning:/etc/grafana/provisioning:ro"]),
        check_grafana,
    ),
    # Dockerfile
    "missing-dockerfile": (_set(f"{GPU}.build.dockerfile", "docker/nope.Dockerfile"), check_dockerfiles),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_rejects_a_broken_copy(compose: Compose, case: str) -> None:
    mutate, check = BROKEN[case]
    broken = copy.deepcopy(compose)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)
    check(compose)  # the unbroken file still passes the same check


def test_the_parser_accepts_what_genq_worker_accepts() -> None:
    name, params = parse_worker_args(["genq-worker", "start", "--profile", "tiny-random", "--mode", "fp32"])
    assert (name, params["profile"], params["mode"], params["concurrency"]) == (
        "start",
        "tiny-random",
        "fp32",
        1,
    )
    name, params = parse_worker_args(
        ["/usr/local/bin/genq-worker", "queues", "--profile", "x", "--mode", "nf4"]
    )
    assert (name, params["mode"]) == ("queues", "nf4")


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${GENQ_PROFILE:-qwen}", {}, "qwen"),
        ("${GENQ_PROFILE:-qwen}", {"GENQ_PROFILE": ""}, "qwen"),
        ("${GENQ_PROFILE-qwen}", {"GENQ_PROFILE": ""}, ""),
        ("${GENQ_PROFILE:-qwen}", {"GENQ_PROFILE": "tiny"}, "tiny"),
        ("a $$HOME ${X:+set}", {"X": "1"}, "a $HOME set"),
        ("$X/$Y", {"X": "a"}, "a/"),
    ],
)
def test_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_interpolation_required_variable() -> None:
    with pytest.raises(AssertionError, match="required"):
        interpolate("${HF_TOKEN:?set HF_TOKEN}", {})


def test_monitoring_files_are_commented_yaml() -> None:
    for path in MONITORING_YAML:
        text = path.read_text(encoding="utf-8")
        assert isinstance(yaml.safe_load(text), dict), path
        assert any(line.lstrip().startswith("#") for line in text.splitlines()), (
            f"{path.name} has no comments"
        )


def test_the_dashboard_is_valid_json_naming_only_genq_metrics() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana" / "dashboards" / "genq.json").read_text())
    check_dashboard(dashboard, {"genq-prometheus"})
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("tokens/s per worker", "queue depth", "eta per job", "items by status", "oom", "chunk"):
        assert needed in titles, needed
    broken = copy.deepcopy(dashboard)
    broken["panels"][0]["targets"][0]["expr"] = "rate(genq_tokens_generated_total[1m])"  # no such metric
    with pytest.raises(AssertionError, match="does not export"):
        check_dashboard(broken, {"genq-prometheus"})
    with pytest.raises(AssertionError, match="not provisioned"):
        check_dashboard(dashboard, {"another-uid"})
