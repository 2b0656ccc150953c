"""Prometheus metrics: a real worker scraped during and after a job agrees with the job store, the
exporter (`genq metrics`) reports what Redis holds, and only first writes are ever counted."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import stop_process
from tests.helpers import (
    RedisServer,
    WorkerProcess,
    env_for,
    free_port,
    genq,
    make_job,
    wait_for,
    write_prompts,
)
from worker.chunks import process_chunk
from worker.core.observe import set_observer
from worker.core.schema import ChunkRef, GenParams, Item, ItemResult, JobSpec, Usage
from worker.core.settings import Settings
from worker.core.states import ItemStatus, Mode
from worker.queue.metrics import PrometheusObserver
from worker.store import RedisStore

PROFILE = "tiny-random"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def job_hash(r: Any, job_id: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in r.hgetall(f"genq:job:{job_id}").items()}


# --- a real worker and the exporter, during and after a job ----------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("metrics")
    server = RedisServer(folder / "redis")
    server.start()
    port, exporter_port = free_port(), free_port()
    # micro-batches above 4 rows fail with an injected OOM (back-offs to count); each micro-batch
    # sleeps a little, so the job lasts long enough to be scraped in the middle
    env = {"GENQ_FAULT_OOM_ABOVE": "4", "GENQ_FAULT_SLOW_MS": "200"}
    worker = WorkerProcess(
        server.url, folder / "w.log", name="mw", env=env, args=["--metrics-port", str(port)]
    )
    import subprocess
    import sys

    exporter = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "metrics", "--port", str(exporter_port)],
        env=env_for(server.url),
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "exporter.log", "wb"),  # noqa: SIM115 - owned by the child
    )
    try:
        worker.start()
        yield {"server": server, "port": port, "exporter": exporter_port, "folder": folder, "worker": worker}
    finally:
        stop_process(exporter)
        worker.stop()
        server.stop()


def test_worker_counters_equal_the_store_after_a_job(cluster: dict[str, Any]) -> None:
    server, port, folder = cluster["server"], cluster["port"], cluster["folder"]
    r = server.client()
    prompts = write_prompts(folder / "in.jsonl", 24)
    with open(prompts, "a") as fh:  # one prompt longer than the profile's 256-token context
        fh.write(json.dumps({"id": "long", "prompt": "fever and cough " * 200}) + "\n")
    job_id = genq(server.url, "submit", str(prompts), "--profile", PROFILE, "--chunk-size", "5").stdout
    job_id = job_id.strip().splitlines()[-1]

    # during the job: some items counted by the worker, and the exporter sees the job unfinished
    def midway() -> tuple[Samples, Samples] | None:
        samples = scrape(port)
        status = job_hash(r, job_id).get("status")
        if value(samples, "genq_items_total") > 0 and status == "in_progress":
            return samples, scrape(cluster["exporter"])
        return None

    during, exported = wait_for(midway, timeout=60, interval=0.05, what="a scrape in the middle of the job")
    assert value(during, "genq_tokens_total", kind="completion") > 0
    assert value(during, "genq_items_total", status="ok") < 24
    pending = value(exported, "genq_job_items", job=job_id, count="pending")
    assert 0 < pending < 25, pending

    wait_for(lambda: job_hash(r, job_id).get("status") == "completed", timeout=60, what="job completed")
    store = job_hash(r, job_id)

    def settled() -> Samples | None:  # the store completes the job before the chunk's end is timed
        samples = scrape(port)
        return samples if value(samples, "genq_chunk_seconds_count") >= 5 else None

    after = wait_for(settled, timeout=10, what="the last chunk timed")
    # the done-when: ok items equal the store's succeeded count
    assert value(after, "genq_items_total", status="ok") == int(store["succeeded"]) == 24
    errored = sum(v for (n, ls), v in after.items() if n == "genq_items_total" and ("status", "ok") not in ls)
    assert errored == int(store["errored"]) == 1
    assert value(after, "genq_items_total", status="context_length_exceeded") == 1
    ok_labels = dict(next(ls for (n, ls), v in after.items() if n == "genq_items_total" and v))
    assert ok_labels | {"status": "ok"} == {
        "profile": PROFILE,
        "mode": "fp32",
        "adapter": "default",
        "status": "ok",
    }
    assert value(after, "genq_tokens_total", kind="completion") == int(store["completion_tokens"]) > 0
    assert value(after, "genq_tokens_total", kind="prompt") == int(store["prompt_tokens"]) > 0
    # 5 chunks, each delivered once; OOM back-offs; the batch size fell to what fits
    assert value(after, "genq_deliveries_total", redelivered="false") == 5
    assert value(after, "genq_deliveries_total", redelivered="true") == 0
    assert value(after, "genq_chunk_seconds_count", outcome="done") == 5
    assert value(after, "genq_oom_backoffs_total") >= 1
    ran = value(after, "genq_batch_seconds_count")
    assert ran >= 5 and value(after, "genq_batch_rows_bucket", le="4.0") == ran  # none above the OOM line
    assert 1 <= value(after, "genq_batch_size") <= 4
    assert value(after, "genq_model_load_seconds") > 0
    assert value(after, "genq_worker_info", worker="mw", mode="fp32", device="cpu") == 1
    assert not any(n == "genq_gpu_memory_bytes" for n, _ in after)  # a CPU worker: no GPU series


def test_exporter_reports_what_redis_holds(cluster: dict[str, Any]) -> None:
    """Jobs by status, per-job counts, queue depth (a job for nf4 workers waits: nobody takes it)."""
    server, folder = cluster["server"], cluster["folder"]
    r = server.client()
    prompts = write_prompts(folder / "nf4.jsonl", 7, prefix="q")
    args = ["submit", str(prompts), "--profile", PROFILE, "--chunk-size", "3", "--mode", "nf4"]
    waiting = genq(server.url, *args).stdout.strip().splitlines()[-1]
    got = scrape(cluster["exporter"])
    assert value(got, "genq_store_up") == 1
    # the dispatcher keeps a few messages on the queue, the rest wait in the job's backlog
    on_queue, backlog = r.llen(f"genq.{PROFILE}.nf4"), r.llen(f"genq:job:{waiting}:backlog")
    assert on_queue + backlog == 3 and backlog >= 1
    assert value(got, "genq_queue_depth", queue=f"genq.{PROFILE}.nf4") == on_queue
    assert value(got, "genq_queue_backlog", queue=f"genq.{PROFILE}.nf4") == backlog
    assert value(got, "genq_queue_depth", queue=f"genq.{PROFILE}.any") == r.llen(f"genq.{PROFILE}.any") == 0
    assert value(got, "genq_jobs", status="queued") == 1
    assert value(got, "genq_job_items", job=waiting, count="pending") == 7
    assert value(got, "genq_workers", profile=PROFILE, mode="fp32") == 1
    for job_id in (k.split(":")[2] for k in r.scan_iter("genq:job:*") if k.count(":") == 2):
        state = job_hash(r, job_id)
        if state.get("status") != "completed":
            continue
        assert value(got, "genq_jobs", status="completed") >= 1
        for count in ("succeeded", "errored"):
            assert value(got, "genq_job_items", job=job_id, count=count) == int(state.get(count, 0))
        assert value(got, "genq_job_completion_tokens", job=job_id) == int(state["completion_tokens"])
        assert not value(got, "genq_job_eta_seconds", job=job_id)  # finished: no ETA


def test_worker_refuses_metrics_with_a_prefork_pool() -> None:
    proc = genq_worker("start", "--profile", PROFILE, "--concurrency", "2", "--metrics-port", "9400")
    assert proc.returncode == 2 and "--metrics-port" in proc.stderr and "--concurrency 1" in proc.stderr


def genq_worker(*args: str) -> Any:
    import subprocess
    import sys

    env = env_for("redis://127.0.0.1:1/0")
    return subprocess.run(
        [sys.executable, "-m", "worker.main", *args], env=env, capture_output=True, text=True, check=False
    )


# --- only first writes count: in-process, against a real Redis -------------------------------------


class Echo:
    """An engine that answers every item at once, after ``before`` has run (another worker)."""

    def __init__(self, before: Callable[[Sequence[Item]], None] = lambda items: None) -> None:
        self.before = before

    def generate(self, items: Sequence[Item], *, on_results: Any = None, **_: Any) -> list[ItemResult]:
        self.before(items)
        results = [answer(it) for it in items]
        if on_results:
            on_results(results)
        return results


def answer(item: Item) -> ItemResult:
    return ItemResult(
        index=item.index,
        id=item.id,
        status=ItemStatus.OK,
        text="x",
        usage=Usage(prompt_tokens=3, completion_tokens=5),
        profile=PROFILE,
        mode=Mode.FP32,
    )


def test_only_first_writes_are_counted(redis_server: RedisServer) -> None:
    """A redelivered chunk skips what is done, and a result another delivery wrote first is
    dropped by the store: neither is counted, so the counter still equals the store."""
    store = RedisStore(redis_server.url, settings=Settings.from_env({}))
    job_id = f"m{free_port()}"
    items = [Item(index=i, id=f"i{i}", line=i + 1, prompt=f"p{i}") for i in range(6)]
    make_job(
        store, JobSpec(job_id=job_id, profile=PROFILE, chunk_size=6, total=6, defaults=GenParams()), items
    )
    ref = ChunkRef(job_id=job_id, chunk_id="c000000", indices=list(range(6)))

    def ok() -> float:
        return (
            REGISTRY.get_sample_value(
                "genq_items_total", {"profile": PROFILE, "mode": "fp32", "adapter": "default", "status": "ok"}
            )
            or 0.0
        )

    def run(engine: Echo) -> None:
        process_chunk(store, engine, ref, worker="w", max_attempts=5, publish=lambda *a: None, control=store)

    start = ok()
    redelivered = REGISTRY.get_sample_value("genq_deliveries_total", {"redelivered": "true"}) or 0.0
    old = set_observer(PrometheusObserver())
    try:
        store.record(job_id, [answer(items[0])], "before")  # done before the chunk runs: skipped
        store.start_attempt(job_id, ref.chunk_id, "killed")  # a first delivery that died

        def rival(todo: Sequence[Item]) -> None:  # another delivery writes two items first
            store.record(job_id, [answer(it) for it in todo[:2]], "rival")

        run(Echo(rival))
        assert int(job_hash(redis_server.client(), job_id)["succeeded"]) == 6
        assert ok() - start == 6  # 1 + 2 written by the others, 3 by this delivery: each once
        run(Echo())  # redelivered after the job completed: nothing to do, nothing counted
        assert ok() - start == 6
        store2 = job_hash(redis_server.client(), job_id)
        assert int(store2["completion_tokens"]) == 30
    finally:
        set_observer(old)
    assert (
        REGISTRY.get_sample_value("genq_deliveries_total", {"redelivered": "true"}) or 0
    ) == redelivered + 1


def test_error_results_are_labelled_with_an_adapter_the_profile_has() -> None:
    """A multi-adapter profile (adapters a and b, default a): an error result names no adapter (a
    worker_lost, say) and is labelled with the one that runs such items; an item naming an adapter
    the profile lacks is labelled ``unknown``, never with that name nor with ``default``."""
    from worker.core.profiles import load_profile
    from worker.core.schema import ErrorInfo, error_result
    from worker.runtime import Runtime

    runtime = Runtime(Settings.from_env({}), name="metrics-adapters")
    runtime.profile = load_profile("tiny-random-multi")
    runtime.mode = Mode.FP32
    profile = runtime.profile.name
    items = [
        Item(index=i, id=f"i{i}", line=i + 1, prompt="p", adapter=a) for i, a in enumerate([None, "zz", "b"])
    ]
    lost = ErrorInfo(type="worker_lost", message="died")
    results = [
        error_result(items[0], lost, profile=profile, mode=Mode.FP32),
        error_result(items[1], ErrorInfo(type="invalid_input", message="no adapter zz"), adapter="zz"),
        ItemResult(
            index=2, id="i2", status=ItemStatus.OK, text="x", adapter="b", profile=profile, mode=Mode.FP32
        ),
    ]

    def labels() -> dict[str, float]:
        found: dict[str, float] = {}
        for metric in REGISTRY.collect():
            for sample in metric.samples:
                if sample.name == "genq_items_total" and sample.labels.get("profile") == profile:
                    found[sample.labels["adapter"]] = found.get(sample.labels["adapter"], 0) + sample.value
        return found

    before = labels()
    PrometheusObserver(runtime).recorded("j", results, [0, 1, 2])
    after = labels()
    added = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert added == {"a": 1, "unknown": 1, "b": 1}
