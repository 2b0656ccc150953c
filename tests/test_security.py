"""Security: pickle is refused, jobs cannot choose what a worker loads, no remote code or pickled
weights by default, and broker credentials are never shown.

The cluster here is real: one ``redis-server`` with ``requirepass`` that listens on a plain port and
on a TLS port (a throw-away self-signed certificate), and one real ``genq-worker`` process that
talks to it over ``rediss://`` with the password.  The producer side uses the plain ``redis://``
URL (``genq`` subprocesses, the Python client) or ``rediss://``, so both schemes are exercised
against the same data.  Attack messages are published with kombu, exactly as an attacker with
access to the broker could.

The loading tests use the tiny model's real files (copied and altered: pickle-only weights, a
``config.json`` whose ``auto_map`` points at planted code).  Each planted payload is shown to be
live first (unpickling it, or a profile that sets ``trust_remote_code: true``, does create the
marker), so its absence elsewhere means genq refused it.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cluster import parse_events, stop_process
from tests.helpers import REPO, WorkerProcess, env_for, free_port, genq, make_job, rows, wait_for
from worker.core.errors import ConfigError, GenqError, ModelLoadError
from worker.core.settings import Settings, redact_url
from worker.queue.publish import publish_chunks
from worker.queue.routing import TASK_NAME, queue_name

PASSWORD = "s3cr3t-pa55"
PROFILE = "tiny-random"
QUEUE_ANY = queue_name(PROFILE, "any")
WORKER = "sec-w"
REFUSED_PICKLE = "Refusing to deserialize untrusted content of type pickle (application/x-python-serialize)"
"""kombu's ContentDisallowed text, which Celery logs when a pickled message reaches the worker."""
LOAD_EVENTS = ("mode_chosen", "model_loaded", "engine_ready")


# --- a password-protected Redis on a plain and a TLS port ------------------------------------------


class SecureRedis:
    """A real ``redis-server`` with ``requirepass``, on a plain port and a TLS port.  The password
    is written to a config file, not passed on the command line."""

    def __init__(self, folder: Path, password: str) -> None:
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.tls_port = free_port()
        self.ca = folder / "tls" / "cert.pem"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        return f"redis://:{password or self.password}@127.0.0.1:{self.port}/0"

    def tls_url(self, password: str | None = None) -> str:
        return (
            f"rediss://:{password or self.password}@127.0.0.1:{self.tls_port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"
        )

    def start(self) -> None:
        binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
        if binary is None or openssl is None:
            pytest.skip("needs redis-server and openssl")
        tls = self.ca.parent
        tls.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", str(tls / "key.pem"), "-out", str(self.ca), "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        conf = self.folder / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f"tls-port {self.tls_port}",
                    f"tls-cert-file {self.ca}",
                    f"tls-key-file {tls / 'key.pem'}",
                    f"tls-ca-cert-file {self.ca}",
                    "tls-auth-clients no",
                    f"requirepass {self.password}",
                    'save ""',
                    "appendonly no",
                    f"dir {self.folder}",
                    f"logfile {self.folder / 'redis.log'}",
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            [binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url())
        wait_for(lambda: _pings(client), timeout=10, interval=0.05, what="redis-server up")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class Cluster:
    redis: SecureRedis
    worker: WorkerProcess
    hf_home: Path
    genq_home: Path
    tmp: Path
    transcript: list[tuple[list[str], str, str]] = field(default_factory=list)
    """Every ``genq`` command run against the cluster: (args, stdout, stderr)."""

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url(), decode_responses=True)

    def genq(self, url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = genq(url, *args, check=check)
        self.transcript.append((list(args), proc.stdout, proc.stderr))
        return proc

    def log(self) -> str:
        return self.worker.log_path.read_text(errors="replace")


def tree(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative), or nothing when it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def refusals(log: str) -> int:
    """Celery's refusals of a pickled message so far (events whose text names it)."""
    return sum(1 for e in parse_events(log) if REFUSED_PICKLE in str(e.get("event")))


def _text(value: bytes) -> str:
    """A hash value as text: a block of inputs decompressed (worker/store/blocks.py), so that a
    password inside a job's inputs could not hide from the check behind zlib."""
    try:
        return zlib.decompress(value).decode("utf-8")
    except zlib.error:
        return value.decode("utf-8", "replace")


def redis_values(r: redis.Redis, key: str) -> list[Any]:
    kind = r.type(key)
    if kind == "string":  # a job's claims bitmap is bytes, not text
        return [r.execute_command("GET", key, NEVER_DECODE=True)]
    if kind == "hash":  # a job's inputs are zlib-compressed blocks: read as the store reads them
        raw = r.execute_command("HGETALL", key, NEVER_DECODE=True)
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        return [(k.decode(), _text(v)) for k, v in pairs]
    if kind == "list":
        return list(r.lrange(key, 0, -1))
    if kind == "set":
        return list(r.smembers(key))
    if kind == "zset":
        return list(r.zrange(key, 0, -1))
    return [kind]


def heartbeat(r: redis.Redis, name: str = WORKER) -> dict[str, Any]:
    raw = r.get(f"genq:worker:{name}")
    return dict(json.loads(raw)) if raw else {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One password-protected Redis (plain + TLS port) and one tiny-random fp32 worker that talks to
    it over ``rediss://``.  The worker has its own genq home and Hugging Face home (so anything it
    would create is visible) and HF_HUB_OFFLINE set, so a worker that wrongly obeyed a job's profile
    could not pull gigabytes from the network (the test would still see it try: load events)."""
    tmp = tmp_path_factory.mktemp("security")
    server = SecureRedis(tmp / "redis", PASSWORD)
    server.folder.mkdir()
    hf_home, genq_home = tmp / "hf-home", tmp / "genq-home"
    worker = WorkerProcess(
        server.tls_url(),
        tmp / "worker.log",
        profile=PROFILE,
        mode="fp32",
        name=WORKER,
        env={"GENQ_HOME": str(genq_home), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )
    try:
        server.start()
        worker.start(timeout=120)
        yield Cluster(server, worker, hf_home, genq_home, tmp)
    finally:
        worker.stop()
        server.stop()


def run_small_job(url: str, n: int = 3, tag: str = "ok") -> str:
    """Submit ``n`` short prompts with the Python client and wait until the job completes."""
    from producer.client import Client

    client = Client(url)
    job = client.submit(
        [{"id": f"{tag}{i}", "prompt": f"the patient {i}", "max_new_tokens": 3} for i in range(n)],
        profile=PROFILE,
        chunk_size=2,
    )
    state = job.wait(poll=0.2, timeout=60)
    assert state.status == "completed" and state.counts.succeeded == n, state.as_dict()
    return job.id


# --- 1. a pickled message is rejected, not executed ----------------------------------------------


class Detonator:
    """Unpickling this runs ``touch <marker>`` (``os.system``): what a malicious pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def publish_pickle(url: str, queue: str, marker: Path, *, celery_headers: bool) -> str:
    """Publish, with kombu, a pickle-serialised message on ``queue`` (its direct exchange and
    routing key, as the worker declares them) whose body runs the :class:`Detonator` when
    unpickled.  ``celery_headers``: a real Celery protocol-2 message for the chunk task (headers
    from Celery itself); else a bare protocol-1 style body naming the task.  Returns the task id."""
    from celery import Celery
    from kombu import Connection, Exchange, Queue

    task_id = f"evil-{uuid.uuid4().hex[:8]}"
    payload = Detonator(marker)
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any
    if celery_headers:
        message = Celery("attacker").amqp.as_task_v2(task_id, TASK_NAME, args=[payload])
        headers, properties, body = message.headers, message.properties, message.body
    else:
        headers, properties = {}, {"correlation_id": task_id}
        body = {"task": TASK_NAME, "id": task_id, "args": [payload], "kwargs": {}}
    exchange = Exchange(queue, type="direct")
    with Connection(url) as conn:
        conn.Producer().publish(
            body,
            serializer="pickle",
            exchange=exchange,
            routing_key=queue,
            declare=[Queue(queue, exchange, routing_key=queue)],
            headers=headers,
            **properties,
        )
    return task_id


@pytest.mark.parametrize("celery_headers", [True, False], ids=["celery-task-message", "bare-pickle"])
def test_pickled_message_is_rejected_not_executed(cluster: Cluster, celery_headers: bool) -> None:
    """A pickled message for ``genq.run_chunk`` on the worker's queue is refused by Celery
    (ContentDisallowed), discarded, never unpickled; the worker keeps consuming."""
    r = cluster.r()
    url = cluster.redis.url()
    tag = "celery" if celery_headers else "bare"

    # the message really is a live pickle: the same message, parked on a queue no worker consumes,
    # is a pickle (content type, headers) and unpickling its body here does run the payload
    probe_queue, probe_marker = f"genq.security-probe-{tag}", cluster.tmp / f"probe-{tag}"
    publish_pickle(url, probe_queue, probe_marker, celery_headers=celery_headers)
    (raw,) = r.lrange(probe_queue, 0, -1)
    r.delete(probe_queue)
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/x-python-serialize"
    assert envelope["properties"]["body_encoding"] == "base64"
    assert (envelope["headers"].get("task") == TASK_NAME) is celery_headers
    assert not probe_marker.exists()
    pickle.loads(base64.b64decode(envelope["body"]))  # on purpose: proves the payload is live
    assert probe_marker.exists(), "the payload must be live for this test to mean anything"

    marker = cluster.tmp / f"pwned-{tag}"
    refused_before = refusals(cluster.log())
    task_id = publish_pickle(url, QUEUE_ANY, marker, celery_headers=celery_headers)
    wait_for(
        lambda: marker.exists() or refusals(cluster.log()) > refused_before,
        timeout=20,
        what="the worker to refuse (or run) the pickle",
    )
    assert not marker.exists(), "the pickled payload was executed by the worker"
    # Celery's own words: a task message it could not accept, or a body it would not decode
    said = (
        f"Received invalid task message: {REFUSED_PICKLE}\nThe message has been ignored and discarded."
        if celery_headers
        else f"Can't decode message body: ContentDisallowed('{REFUSED_PICKLE}')"
    )
    # Celery's lines are genq events now (one log format): the event's text is Celery's words
    assert sum(1 for e in parse_events(cluster.log()) if str(e["event"]).startswith(said)) == 1
    # discarded: not waiting on the queue, not held unacknowledged for a later redelivery
    assert r.llen(QUEUE_ANY) == 0
    assert not any(task_id in str(v) for v in r.hvals("unacked"))
    time.sleep(2)
    assert not marker.exists(), "the pickled payload was executed by the worker"
    assert cluster.worker.alive()

    # still consuming: a normal job published after the pickle runs to completion
    run_small_job(url, tag=f"after-{tag}-")
    assert not marker.exists()
    assert cluster.worker.alive() and heartbeat(r).get("profile") == PROFILE


# --- 2. a job naming a profile the worker does not serve -----------------------------------------


@pytest.mark.parametrize("kind", ["real-profile-not-served", "no-such-profile", "profile-file-path"])
def test_job_naming_another_profile_loads_and_downloads_nothing(cluster: Cluster, kind: str) -> None:
    """A hand-made job on the worker's queue naming another profile (a real 7B profile, an
    unknown name, a path to a YAML that claims ``name: tiny-random`` and asks for remote code) ends
    with every item an ``unknown_profile`` error; the worker loads nothing, downloads nothing,
    creates no file, and still serves its own profile."""
    from producer.client import Client
    from producer.inputs import items_from_records
    from worker.core.schema import JobSpec

    if kind == "real-profile-not-served":
        other = "qwen2.5-7b-medical"
        assert (REPO / "configs" / f"{other}.yaml").is_file()
    elif kind == "no-such-profile":
        other = "not-a-profile"
    else:
        impostor = cluster.tmp / "impostor" / f"{PROFILE}.yaml"
        impostor.parent.mkdir(exist_ok=True)
        impostor.write_text(f"name: {PROFILE}\ntiny: true\ntrust_remote_code: true\nuse_safetensors: false\n")
        other = str(impostor)

    r = cluster.r()
    log_before = cluster.log()
    loads_before = {e: len(parse_events(log_before, e)) for e in LOAD_EVENTS}
    hf_before, home_before = tree(cluster.hf_home), tree(cluster.genq_home)

    client = Client(cluster.redis.url())
    items = items_from_records(
        [{"id": f"x{i}", "prompt": f"hello {i}", "max_new_tokens": 3} for i in range(5)]
    ).items
    spec = JobSpec(job_id=f"foreign-{kind}", profile=other, chunk_size=2, total=len(items))
    chunks = {"c000000": [0, 1], "c000001": [2, 3], "c000002": [4]}
    make_job(client.store, spec, items)
    # routed like the producer routes, but onto the queue this worker consumes
    publish_chunks(spec.model_copy(update={"profile": PROFILE}), chunks, client.app)

    state = wait_for(
        lambda: (s := client.job(spec.job_id).status()).final and s,
        timeout=30,
        what="the foreign job to finish",
    )
    assert state.status == "completed"
    assert state.counts.as_dict() == {
        "total": 5,
        "succeeded": 0,
        "errored": 5,
        "cancelled": 0,
        "expired": 0,
        "pending": 0,
    }
    results = [res for _, res in client.store.results(spec.job_id, spec.total)]
    assert [res.id if res else None for res in results] == [f"x{i}" for i in range(5)]
    for res in results:
        assert res is not None and res.status == "error" and res.error is not None
        assert res.error.type == "unknown_profile"
        assert res.error.message == f"worker {WORKER} does not serve profile {other!r}"
        assert res.text is None and res.usage.completion_tokens == 0

    log = cluster.log()
    refusals = [e for e in parse_events(log, "wrong_profile") if e.get("job") == spec.job_id]
    assert len(refusals) == 3 and {e["job_profile"] for e in refusals} == {other}
    assert {e["worker_profile"] for e in refusals} == {PROFILE}
    # nothing loaded, nothing downloaded, nothing written
    assert {e: len(parse_events(log, e)) for e in LOAD_EVENTS} == loads_before
    new_text = log[len(log_before) :]
    for needle in ("ModelLoadError", "Traceback", "huggingface", "Downloading"):
        assert needle not in new_text
    assert tree(cluster.hf_home) == hf_before
    assert tree(cluster.genq_home) == home_before
    assert cluster.worker.alive()
    beat = heartbeat(r)
    assert beat["profile"] == PROFILE and beat["mode"] == "fp32"


# --- 4. credentials: a password works over redis:// and rediss://, and is never shown ------------


def test_password_works_over_redis_and_rediss_and_is_never_shown(cluster: Cluster, tmp_path: Path) -> None:
    """A job submitted with the plain URL and followed with the TLS URL (the worker itself is on
    TLS) completes.  The password appears in no genq output (submit, status, workers, collect, and
    every command earlier tests ran), not in the worker's log, not anywhere in Redis; the log shows
    the broker redacted."""
    plain, tls = cluster.redis.url(), cluster.redis.tls_url()
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": f"fever {i}", "max_new_tokens": 4}) + "\n" for i in range(6)
        )
    )
    job_id = cluster.genq(
        plain, "submit", str(prompts), "--profile", PROFILE, "--chunk-size", "2"
    ).stdout.split()[-1]
    r = cluster.r()
    wait_for(lambda: r.hget(f"genq:job:{job_id}", "status") == "completed", timeout=60, what="job completed")
    state = json.loads(cluster.genq(tls, "status", job_id, "--json").stdout)
    assert state["status"] == "completed" and state["counts"]["succeeded"] == 6
    assert state["workers"][WORKER]["items"] == 6
    human = cluster.genq(tls, "status", job_id).stdout
    assert job_id in human and f"{WORKER}: 6 items" in human
    listed = json.loads(cluster.genq(plain, "status", "--json").stdout)
    assert job_id in [s["job_id"] for s in listed]
    workers = json.loads(cluster.genq(tls, "workers", "--json").stdout)
    assert [w["name"] for w in workers] == [WORKER]
    cluster.genq(plain, "workers")
    out = tmp_path / "out.jsonl"
    cluster.genq(tls, "collect", job_id, "-o", str(out))
    got = rows(out)
    assert [g["id"] for g in got] == [f"s{i}" for i in range(6)]
    assert all(g["status"] == "ok" and g["worker"] == WORKER for g in got)

    # never shown
    assert len(cluster.transcript) >= 6
    for args, stdout, stderr in cluster.transcript:
        assert PASSWORD not in stdout + stderr, f"password shown by genq {' '.join(args)}"
    log = cluster.log()
    assert PASSWORD not in log
    (starting,) = parse_events(log, "worker_starting")
    assert starting["broker"] == cluster.redis.tls_url().replace(PASSWORD, "***")
    # Celery's own "Connected to" line, as a genq event, with the password hidden by genq's redaction
    connected = f"Connected to rediss://:***@127.0.0.1:{cluster.redis.tls_port}/0"
    assert connected in [e["event"] for e in parse_events(log)]
    for key in r.scan_iter("*"):
        assert PASSWORD not in f"{key} {redis_values(r, key)}", f"password stored in Redis key {key}"


@pytest.mark.parametrize(
    "scheme,password",
    [("redis", "wrong-pw"), ("rediss", "wrong-pw"), ("redis", None)],
    ids=["redis-wrong", "rediss-wrong", "redis-none"],
)
def test_refused_credentials_give_one_clear_line(cluster: Cluster, scheme: str, password: str | None) -> None:
    """``genq status`` and ``genq submit`` with a wrong (or no) password exit 2 with one line
    naming the redacted URL and the fix; no traceback, no password, no hang."""
    if password is None:
        url = f"redis://127.0.0.1:{cluster.redis.port}/0"
        shown = url
    else:
        url = cluster.redis.url(password) if scheme == "redis" else cluster.redis.tls_url(password)
        shown = url.replace(password, "***")
    prompts = cluster.tmp / "one.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    for args in (["status"], ["submit", str(prompts), "--profile", PROFILE]):
        started = time.monotonic()
        proc = cluster.genq(url, *args, check=False)
        assert time.monotonic() - started < 20
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(
            f"genq: error: Redis at {shown} refused the credentials in GENQ_BROKER_URL: "
        ), lines[0]
        assert "Traceback" not in proc.stderr
        if password is not None:
            assert password not in proc.stderr
        assert PASSWORD not in proc.stderr


def run_refused_worker(cluster: Cluster, url: str, name: str) -> tuple[int, str]:
    """Start a worker on ``url`` that is expected to stop by itself: its exit status and log."""
    log = cluster.tmp / f"{name}.log"
    worker = WorkerProcess(
        url, log, name=name, env={"GENQ_HOME": str(cluster.genq_home), "HF_HOME": str(cluster.hf_home)}
    )
    worker.start(wait=False)
    try:
        assert worker.proc is not None
        rc = worker.proc.wait(30)
    finally:
        worker.stop()
    return rc, log.read_text()


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_worker_with_wrong_password_stops_with_a_clear_redacted_message(
    cluster: Cluster, scheme: str
) -> None:
    """A worker given a wrong password stops at once (before loading the model) with exit status 2
    and one line naming the redacted URL; the password is nowhere in its log."""
    bad = "wrong-pw"
    url = cluster.redis.url(bad) if scheme == "redis" else cluster.redis.tls_url(bad)
    rc, text = run_refused_worker(cluster, url, f"bad-{scheme}")
    assert rc == 2, text
    assert (
        f"genq-worker: error: Redis at {url.replace(bad, '***')} refused the credentials in GENQ_BROKER_URL"
        in text
    )
    assert bad not in text and PASSWORD not in text
    assert "Traceback" not in text
    assert not parse_events(text, "model_loaded")
    assert not cluster.r().exists(f"genq:worker:bad-{scheme}")


# --- 5. rediss:// URLs and redaction (unit level) ---------------------------------------------------


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://:s3cr3t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://genq:s3cr3t@redis.internal:6379/2", "redis://genq:***@redis.internal:6379/2"),
        (
            "rediss://genq:s3cr3t@redis.example.com:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
            "rediss://genq:***@redis.example.com:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem",
        ),
        ("redis://:s3cr3t%40x%3Ay@h:1/0", "redis://:***@h:1/0"),
        ("redis://:s3c@r3t@h:1/0", "redis://:***@h:1/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "rediss://redis.example.com:6380/0?ssl_cert_reqs=none",
            "rediss://redis.example.com:6380/0?ssl_cert_reqs=none",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3c" not in redact_url(url)


def test_settings_take_a_rediss_url_and_never_show_it() -> None:
    url = "rediss://genq:s3cr3t-pa55@redis.example.com:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    settings = Settings.from_env({"GENQ_BROKER_URL": url})
    assert settings.broker == url
    assert settings.broker_display == url.replace(PASSWORD, "***")
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump())):
        assert PASSWORD not in text
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"GENQ_BROKER_URL": url, "GENQ_VISIBILITY_TIMEOUT": "soon"})
    assert "GENQ_VISIBILITY_TIMEOUT" in info.value.message and PASSWORD not in info.value.message
    # the job store and the Celery broker both connect with TLS and the URL's certificate settings
    from worker.queue.app import make_app
    from worker.store import connect

    client = connect(url)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem" and kwargs["password"] == PASSWORD
    conn = make_app(settings).connection_for_write()
    assert conn.transport_cls == "rediss"
    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert PASSWORD not in conn.as_uri()


@pytest.mark.parametrize("secret", ["pa#ss-w0rd", "pa/ss-w0rd", "pa?ss-w0rd"])
def test_password_with_url_special_characters_is_never_shown(secret: str) -> None:
    url = f"redis://:{secret}@127.0.0.1:6379/0"
    assert secret not in redact_url(url) and "ss-w0rd" not in redact_url(url)
    from worker.store import RedisStore

    with pytest.raises(GenqError) as info:
        RedisStore(url).ping()
    # redis-py's parse error quotes the part of the password before the special character
    assert secret not in info.value.message and "'pa'" not in info.value.message


def test_redact_url_never_raises() -> None:
    assert "s3cr3t" not in redact_url("redis://:s3cr3t@127.0.0.1:notaport/0")


def test_worker_with_an_unparseable_url_stops_with_a_clear_redacted_message(cluster: Cluster) -> None:
    """A worker whose GENQ_BROKER_URL cannot be parsed (an unencoded '#' in the password) stops at
    once with exit status 2 and one line saying what to encode; no part of the password shows."""
    url = "redis://:pa#ss-w0rd@127.0.0.1:6379/0"
    rc, text = run_refused_worker(cluster, url, "unparseable")
    assert rc == 2, text
    assert "genq-worker: error: GENQ_BROKER_URL=redis://:***@" in text and "percent-encode" in text
    assert "ss-w0rd" not in text and "'pa'" not in text and "Traceback" not in text
    assert not parse_events(text, "model_loaded")


# --- 3. trust_remote_code off, safetensors only, unless a profile says otherwise --------------------


@pytest.fixture(scope="module")
def tiny_dirs() -> tuple[Path, Path]:
    from worker.core.profiles import load_profile
    from worker.core.settings import reset_settings
    from worker.model.loading import resolve_sources

    reset_settings()
    src = resolve_sources(load_profile(PROFILE))
    assert src.adapter is not None
    return src.base, src.adapter


def pickle_only_copy(src: Path, dst: Path, weights: str) -> Path:
    """A copy of a model folder whose ``*.safetensors`` weights are re-saved as ``weights`` (a
    pickle-based torch file) and removed."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state: dict[str, Any] = {}
    for f in sorted(dst.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    torch.save(state, dst / weights)
    return dst


def test_profiles_default_to_no_remote_code_and_safetensors_only() -> None:
    from worker.core.profiles import Profile, load_profile
    from worker.model.loading import UNSAFE_PATTERNS, hub_patterns

    bare = Profile(name="x", base="org/model")
    assert bare.trust_remote_code is False and bare.use_safetensors is True
    for yaml_file in sorted((REPO / "configs").glob("*.yaml")):
        prof = load_profile(yaml_file)
        assert prof.trust_remote_code is False, yaml_file
        assert prof.use_safetensors is True, yaml_file
    allow, ignore = hub_patterns(bare)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for p in allow)
    assert set(UNSAFE_PATTERNS) <= set(ignore)
    allow_unsafe, ignore_unsafe = hub_patterns(bare.model_copy(update={"use_safetensors": False}))
    assert "*.bin" in allow_unsafe and "*.bin" not in ignore_unsafe


def test_hub_download_asks_only_for_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub profile's download never asks for pickle-based files (no network: the call is
    recorded and answered with a local folder)."""
    import huggingface_hub

    from worker.core.profiles import Profile
    from worker.model.loading import resolve_sources

    calls: list[dict[str, Any]] = []
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")

    def fake_snapshot(repo: str, **kwargs: Any) -> str:
        calls.append({"repo": repo, **kwargs})
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    resolve_sources(Profile(name="hub", base="org/model", base_revision="abc123"))
    (call,) = calls
    assert call["repo"] == "org/model" and call["revision"] == "abc123"
    for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"):
        assert pattern in call["ignore_patterns"] and pattern not in call["allow_patterns"]


def test_pickle_only_weights_are_refused_unless_the_profile_allows_them(
    tiny_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Base weights only in ``pytorch_model.bin``: loading refuses, naming the folder, the profile
    file and ``use_safetensors: false``.  The same folder loads once a profile sets it, with the same
    weights (the refusal is the policy, not a broken file).  Same for an adapter."""
    import torch
    from safetensors.torch import load_file

    from worker.core.profiles import load_profile
    from worker.model.loading import load_model, resolve_sources

    base, adapter = tiny_dirs
    unsafe_base = pickle_only_copy(base, tmp_path / "bin-base", "pytorch_model.bin")
    strict = tmp_path / "strict.yaml"
    strict.write_text(f"base: {unsafe_base}\n")
    with pytest.raises(ModelLoadError) as info:
        load_model(load_profile(strict), "fp32")
    message = info.value.message
    assert str(unsafe_base) in message and str(strict) in message
    assert "use_safetensors: false" in message and "refuses pickle" in message

    allowed = tmp_path / "allowed.yaml"
    allowed.write_text(f"base: {unsafe_base}\nuse_safetensors: false\n")
    loaded = load_model(load_profile(allowed), "fp32")
    expected = load_file(str(base / "model.safetensors"))
    got = dict(loaded.model.named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name].detach(), expected[name].float())

    unsafe_adapter = pickle_only_copy(adapter, tmp_path / "bin-adapter", "adapter_model.bin")
    with_adapter = tmp_path / "adapter.yaml"
    with_adapter.write_text(f"base: {base}\nadapter: {unsafe_adapter}\n")
    with pytest.raises(ModelLoadError) as info:
        resolve_sources(load_profile(with_adapter))
    assert str(unsafe_adapter) in info.value.message and "use_safetensors: false" in info.value.message


def remote_code_copy(base: Path, dst: Path, marker: Path, model_type: str = "qwen2") -> Path:
    """A copy of the tiny base whose config and tokenizer config point (``auto_map``) at a planted
    ``planted.py`` that creates ``marker`` (and raises) when imported."""
    shutil.copytree(base, dst)
    (dst / "planted.py").write_text(
        f"import pathlib\n\npathlib.Path({str(marker)!r}).touch()\n"
        "raise RuntimeError('the planted remote code was executed')\n"
    )
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["planted.PlantedTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


def test_tiny_profile_loads_with_trust_remote_code_off_and_safetensors_on(
    tiny_profile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``from_pretrained`` genq makes for the tiny profile passes ``trust_remote_code=False``
    and the model's passes ``use_safetensors=True``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from worker.model.loading import load_model

    seen: dict[str, list[dict[str, Any]]] = {}

    def spy(cls: Any, label: str) -> None:
        original = cls.from_pretrained

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.setdefault(label, []).append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", wrapper)

    spy(AutoConfig, "config")
    spy(AutoModelForCausalLM, "model")
    spy(AutoTokenizer, "tokenizer")
    load_model(tiny_profile, "fp32")
    assert set(seen) == {"config", "model", "tokenizer"}
    for label, calls in seen.items():
        assert calls and all(c.get("trust_remote_code") is False for c in calls), (label, calls)
    assert all(c.get("use_safetensors") is True for c in seen["model"])


def test_planted_remote_code_is_not_run(tiny_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """``auto_map`` pointing at planted code: with the default profile the code is never imported
    (a known ``model_type`` loads genq's own class; an unknown one is refused).  Control: a profile
    that sets ``trust_remote_code: true`` does run it (in a subprocess with its own HF_HOME)."""
    from worker.core.profiles import load_profile
    from worker.model.loading import load_model

    base, _ = tiny_dirs
    marker = tmp_path / "remote-code-ran"
    known = remote_code_copy(base, tmp_path / "known", marker)
    (tmp_path / "known.yaml").write_text(f"base: {known}\n")
    loaded = load_model(load_profile(tmp_path / "known.yaml"), "fp32")
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert "Planted" not in type(loaded.tokenizer).__name__
    assert not marker.exists()

    unknown = remote_code_copy(base, tmp_path / "unknown", marker, model_type="planted-model")
    (tmp_path / "unknown.yaml").write_text(f"base: {unknown}\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(load_profile(tmp_path / "unknown.yaml"), "fp32")
    assert not marker.exists()

    control_marker = tmp_path / "control-ran"
    control = remote_code_copy(base, tmp_path / "control", control_marker)
    (tmp_path / "trusting.yaml").write_text(f"base: {control}\ntrust_remote_code: true\n")
    code = (
        "from worker.core.profiles import load_profile\nfrom worker.model.loading import load_model\n"
        f"try:\n    load_model(load_profile({str(tmp_path / 'trusting.yaml')!r}), 'fp32')\n"
        "except Exception as exc:\n    print(type(exc).__name__)\n"
    )
    env = env_for(None, HF_HOME=str(tmp_path / "hf-control"), HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, timeout=120
    )
    assert control_marker.exists(), "control: trust_remote_code: true must run the planted code"
    assert not marker.exists()


def test_refused_remote_code_is_a_model_load_error(tiny_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from worker.core.profiles import load_profile
    from worker.model.loading import load_model

    marker = tmp_path / "ran"
    folder = remote_code_copy(tiny_dirs[0], tmp_path / "m", marker, model_type="planted-model")
    profile_file = tmp_path / "p.yaml"
    profile_file.write_text(f"base: {folder}\n")
    with pytest.raises(ModelLoadError) as info:
        load_model(load_profile(profile_file), "fp32")
    assert "trust_remote_code" in info.value.message and str(profile_file) in info.value.message
    assert not marker.exists()
