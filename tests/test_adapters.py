"""Several LoRA adapters on one base (issue 15, part 3): tiny adapters ``a`` and ``b`` on the tiny
base (configs/tiny-random-multi.yaml).  An item's greedy text in a mixed micro-batch equals what a
worker loaded with its adapter alone writes, in fp32 and nf4; the prefix cache keeps adapters
apart; names the profile does not list are refused; one worker process serves jobs of both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RedisServer, WorkerProcess, rows
from worker.core.errors import ConfigError, InputError
from worker.core.profiles import load_profile
from worker.core.schema import Item

PROMPTS = [
    "the patient has a history of chest pain",
    "what is the dose of aspirin for an adult ?",
    "symptoms include fever , cough and fatigue",
    "blood pressure was 140 / 90 mmHg .",
    "explain the treatment options for type 2 diabetes",
    "shortness of breath",
]
NEW = 10


def items(adapters: list[str | None], prompts: list[str] = PROMPTS) -> list[Item]:
    return [
        Item(index=i, id=f"q{i}", prompt=p, adapter=a, params={"max_new_tokens": NEW})  # type: ignore[arg-type]
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    ]


def single_profile(folder: Path, name: str) -> Path:
    """A profile with only the tiny adapter ``name`` (a one-adapter worker: merged in fp32)."""
    path = folder / f"tiny-only-{name}.yaml"
    seed = {"a": 1, "b": 2}[name]
    path.write_text(f"# one tiny adapter\ntiny: true\nadapters:\n  {name}:\n    tiny: {seed}\n")
    return path


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Any]]:
    """Loaded models by (profile, mode), loaded on first use."""
    from worker.model.loading import load_model

    folder = tmp_path_factory.mktemp("profiles")
    cache: dict[tuple[str, str], Any] = {}

    class Loads(dict[tuple[str, str], Any]):
        def __missing__(self, key: tuple[str, str]) -> Any:
            which, mode = key
            source = "tiny-random-multi" if which == "multi" else single_profile(folder, which)
            cache[key] = load_model(load_profile(source), mode)
            return cache[key]

    yield Loads()


def texts(loaded: Any, batch: list[Item], **engine_options: Any) -> list[str | None]:
    from worker.engine import Engine

    engine = Engine(loaded)
    for key, value in engine_options.items():
        setattr(engine, key, value)
    return [r.text for r in engine.generate(batch)]


@pytest.mark.parametrize("mode", ["fp32", "nf4"])
def test_mixed_micro_batch_equals_single_adapter_workers(
    loads: dict[tuple[str, str], Any], mode: str
) -> None:
    """a/b interleaved in one micro-batch (rows of both adapters in every prefill and decode
    pass) give, token for token, what a worker loaded with that adapter alone gives; and a and b
    differ.  The single-adapter fp32 worker has its adapter merged, the multi one unmerged."""
    from worker.engine import Engine

    multi = loads["multi", mode]
    assert multi.adapter == "unmerged" and list(multi.adapters) == ["a", "b"]
    assert loads["a", mode].adapter == ("merged" if mode == "fp32" else "unmerged")
    mixed = ["a", "b"] * (len(PROMPTS) // 2)
    engine = Engine(multi)
    engine.group_adapters = False  # one micro-batch, both adapters in every pass
    results = engine.generate(items(mixed))  # type: ignore[arg-type]
    assert engine.forward.router is not None and engine.forward.router.passes > 0
    alone = {name: texts(loads[name, mode], items([None] * len(PROMPTS))) for name in ("a", "b")}
    for i, r in enumerate(results):
        assert r.ok and r.adapter == mixed[i]
        assert r.text == alone[mixed[i]][i], (i, mixed[i])
    assert results[0].model == "tiny-random:tiny-random-lora-a"
    assert results[1].model == "tiny-random:tiny-random-lora-b"
    differ = sum(ta != tb for ta, tb in zip(alone["a"], alone["b"], strict=True))
    assert differ == len(PROMPTS), "the two tiny adapters must give different greedy texts"
    if mode == "fp32":  # micro-batches by adapter (the default) give the same; no name: a's
        assert texts(multi, items(mixed)) == [r.text for r in results]  # type: ignore[arg-type]
        assert texts(multi, items([None] * len(PROMPTS))) == alone["a"]


def test_prefix_cache_keeps_adapters_apart(loads: dict[tuple[str, str], Any]) -> None:
    """Rows sharing a long prefix through different adapters reuse only their own adapter's keys
    and values: the same texts as without prefix reuse, one kept prefix per adapter."""
    from worker.engine import Engine
    from worker.engine.prefix import PrefixCache, PrefixKV

    cache = PrefixCache()
    cache.put(PrefixKV(ids=(1, 2, 3), keys=[], values=[], adapter="a"))
    assert cache.get((1, 2, 3), "b") is None and cache.get((1, 2, 3), "a") is not None

    shared = "explain the treatment options for type 2 diabetes in simple words . " * 4
    prompts = [shared + p for p in PROMPTS[:4]]
    batch = items(["a", "b", "b", "a"], prompts)  # type: ignore[arg-type]
    multi = loads["multi", "fp32"]
    engine = Engine(multi)
    engine.group_adapters = False
    reused = [r.text for r in engine.generate(batch)]
    assert len(engine.prefixes) == 2, "one prefix per adapter"
    assert {e.adapter for e in engine.prefixes.entries()} == {"a", "b"}
    assert reused == texts(multi, batch, reuse_prefixes=False, group_adapters=False)


def test_unknown_adapters_are_refused(tmp_path: Path, loads: dict[tuple[str, str], Any]) -> None:
    from producer.inputs import read_items
    from producer.options import SubmitOptions, input_limits
    from worker.engine import Engine

    bad = tmp_path / "bad.yaml"
    bad.write_text("# bad\ntiny: true\nadapters:\n  a:\n    tiny: 1\ndefault_adapter: zz\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'default_adapter'.*'zz'"):
        load_profile(bad)
    bad.write_text("# bad\ntiny: true\nadapters:\n  a/b:\n    path: /tmp\n")
    with pytest.raises(ConfigError, match=r"field 'adapters'"):
        load_profile(bad)

    profile = load_profile("tiny-random-multi")
    lines = [{"id": "x", "prompt": "hi", "adapter": "a"}, {"id": "y", "prompt": "hi", "adapter": "../evil"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError) as caught:
        read_items(src, limits=input_limits(profile))
    assert caught.value.line == 2 and caught.value.field == "adapter"
    assert 'the profile lists "a", "b"' in str(caught.value)
    read = read_items(src, limits=input_limits(profile), skip_invalid=True)
    assert read.items[0].adapter == "a" and read.items[1].invalid is not None
    job_default = read_items(tmp_path / "in.jsonl", limits=input_limits(profile, "b"), skip_invalid=True)
    assert job_default.items[0].adapter == "a", "an item's own adapter wins over the job's"
    with pytest.raises(InputError, match="--adapter: unknown adapter 'c'") as job:
        SubmitOptions(profile=profile, adapter="c").check()
    assert job.value.field == "adapter"

    # the worker checks again (a job stored by something other than genq submit)
    result = Engine(loads["multi", "fp32"]).generate([Item(index=0, id="z", prompt="hi", adapter="zz")])[0]
    assert result.error_type == "invalid_input" and "unknown adapter 'zz'" in (result.error.message or "")  # type: ignore[union-attr]


def test_one_worker_serves_jobs_naming_each_adapter(
    tmp_path: Path, redis_server: RedisServer, loads: dict[tuple[str, str], Any]
) -> None:
    """One fp32 worker of tiny-random-multi serves a job with --adapter a and one with --adapter b
    (and an item of job a naming b), in one run; rows record the adapter and equal the
    single-adapter workers' texts.  Then `genq run --adapter b`, embedded, writes the same."""
    from producer.client import Client

    src = tmp_path / "in.jsonl"
    lines = [{"id": f"q{i}", "prompt": p, "max_new_tokens": NEW} for i, p in enumerate(PROMPTS[:4])]
    lines[3]["adapter"] = "b"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))

    worker = WorkerProcess(redis_server.url, tmp_path / "w.log", profile="tiny-random-multi", mode="fp32")
    worker.start(wait=False)  # loads while the single-adapter texts are computed
    alone = {n: texts(loads[n, "fp32"], items([None] * 4, PROMPTS[:4])) for n in ("a", "b")}
    try:
        worker.wait_ready()
        client = Client(redis_server.url)
        jobs = {n: client.submit(src, profile="tiny-random-multi", adapter=n) for n in ("a", "b")}
        assert jobs["a"].id != jobs["b"].id
        for name, job in jobs.items():
            assert job.wait(timeout=60).status == "completed"
            got = [r.public() for r in job.results()]
            want = [name, name, name, "b"]
            assert [g["adapter"] for g in got] == want
            assert [g["text"] for g in got] == [alone[w][i] for i, w in enumerate(want)]
    finally:
        worker.stop()

    from click.testing import CliRunner

    from producer.cli import cli

    out = tmp_path / "out.jsonl"  # `genq run` embedded, in this process (no second torch import)
    args = ["run", str(src), "-o", str(out), "--profile", "tiny-random-multi", "--adapter", "b"]
    ran = CliRunner().invoke(cli, args)
    assert ran.exit_code == 0, ran.output
    embedded = rows(out)
    assert [r["adapter"] for r in embedded] == ["b"] * 4
    assert [r["text"] for r in embedded] == alone["b"]
