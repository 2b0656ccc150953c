"""The embedded `genq run` builds its job as `genq submit` does and streams its input.

- the same file and options make the same job id and spec, whichever command builds it (the real
  `genq submit` against a real Redis, the real embedded `genq run`);
- the run holds one window of items at a time, whatever the input's size, also when it resumes
  from an output whose rows are out of order, some missing and some answering a changed request;
- a bad line stops the run before the model loads and before anything is written, with the same
  one-line error (file, line, field) as a submit; ``--skip-invalid`` records it as an errored row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from producer.build import EmbeddedJob, JobBuilder
from producer.cli import cli
from producer.options import SubmitOptions
from tests.helpers import RedisServer, genq, rows
from tests.test_bad_input_cli import NATIVE_CASES, OPENAI_CASES, Bad, file_with
from worker.core.errors import InputError
from worker.core.schema import GenParams, JobSpec
from worker.core.settings import Settings, reset_settings
from worker.local import run_embedded
from worker.local.manifest import manifest_path

PROFILE = "tiny-random"
VOLATILE = {"created_at", "expires_at", "incarnation"}
"""What differs between two builds of one job: when it was built, and which life of its id."""


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- one construction path ---------------------------------------------------------------------


def test_submit_and_the_embedded_run_build_the_same_job(redis_server: RedisServer, tmp_path: Path) -> None:
    """`genq submit FILE` and `genq run FILE` (embedded) with the same options: the same derived
    job id, and the same spec (options, total, input digest, source fingerprint), the one stored
    in Redis and the one the embedded run's manifest records."""
    from worker.store import RedisStore

    src = tmp_path / "same.jsonl"
    good = [json.dumps({"id": f"s{i}", "prompt": f"same {i}"}) for i in range(5)]
    src.write_text("\n".join([*good[:2], '{"id": "bad", "prompt": 7}', *good[2:]]) + "\n")
    options = ["--profile", PROFILE, "--chunk-size", "3", "--max-new-tokens", "1"]
    options += ["--system-prompt", "be brief", "--skip-invalid"]
    submitted = genq(redis_server.url, "submit", str(src), *options)
    job_id = submitted.stdout.strip().splitlines()[-1]
    stored = RedisStore(settings=Settings.from_env({"GENQ_BROKER_URL": redis_server.url})).spec(job_id)

    out = tmp_path / "out.jsonl"
    ran = genq(None, "run", str(src), "-o", str(out), *options)
    assert ran.stderr.rstrip().endswith(f"job {job_id}"), ran.stderr[-500:]
    header = json.loads(manifest_path(out).read_text().splitlines()[0])
    embedded = JobSpec.model_validate(header["job"])
    assert embedded.model_dump(exclude=VOLATILE) == stored.model_dump(exclude=VOLATILE)
    assert (embedded.total, embedded.skip_invalid, embedded.chunk_size) == (6, True, 3)
    assert embedded.input_digest and embedded.source_fingerprint


def test_a_file_changed_between_the_passes_stops_the_run(tiny_profile: Any, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"c{i}", "prompt": f"one {i}"} for i in range(5)])
    job = EmbeddedJob(JobBuilder(src, SubmitOptions(profile=tiny_profile)), "changing")
    assert sum(len(w) for w in job.windows(2)) == 5 and job.spec().total == 5
    write_jsonl(src, [{"id": f"c{i}", "prompt": f"two {i}"} for i in range(5)])
    with pytest.raises(InputError, match="changed while genq run read it"):
        list(job.windows(2))


# --- memory: one window at a time -------------------------------------------------------------


def test_the_embedded_run_holds_one_window_whatever_the_input(tiny_profile: Any, tmp_path: Path) -> None:
    """1,500 one-token items through windows of 96: the run never holds more than a window of
    items (planning the resume, or running), the output is every item once, in input order.
    Then a resume from an output with rows missing, out of order, and two answering a changed
    request: still one window held, the kept rows kept byte for byte, the rest generated, the
    output in input order."""
    n, window = 1500, 96
    records = [{"id": f"m{i}", "prompt": f"p {i}"} for i in range(n)]
    src = write_jsonl(tmp_path / "many.jsonl", records)
    options = SubmitOptions(profile=tiny_profile, chunk_size=16, params=GenParams(max_new_tokens=1))
    out = tmp_path / "out.jsonl"

    def run() -> Any:
        job = EmbeddedJob(JobBuilder(src, options), "many")
        return run_embedded(job, out, profile=tiny_profile, mode="fp32", window=window)

    first = run()
    assert first.counts.succeeded == n and first.generated == n
    assert 0 < first.peak_held <= window < n // 10
    assert [r["id"] for r in rows(out)] == [f"m{i}" for i in range(n)]

    # a rerun: every 7th row lost, the rest shuffled, two requests changed
    lines = out.read_text().splitlines(keepends=True)
    kept = [line for i, line in enumerate(lines) if i % 7]
    random.Random(5).shuffle(kept)
    out.write_text("".join(kept))
    records[10]["prompt"] = records[1000]["prompt"] = "changed"
    write_jsonl(src, records)
    before = {json.loads(line)["id"]: line for line in lines}
    second = run()
    lost = {i for i in range(n) if i % 7 == 0}
    assert (second.resumed, second.changed) == (n - len(lost) - 2, 2)
    assert second.generated == len(lost) + 2 and second.counts.succeeded == n
    assert 0 < second.peak_held <= window
    now = out.read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in now] == [f"m{i}" for i in range(n)]
    regenerated = lost | {10, 1000}
    assert all(now[i] == before[f"m{i}"] for i in range(n) if i not in regenerated)


# --- bad input ------------------------------------------------------------------------------


def run_embedded_cli(*args: str) -> Any:
    """``genq run ARGS`` in this process, with no broker (embedded)."""
    reset_settings()
    try:
        return CliRunner().invoke(cli, ["run", *args], env={"GENQ_BROKER_URL": None})
    finally:
        reset_settings()


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in {**NATIVE_CASES, **OPENAI_CASES}.items()])
def test_a_bad_line_stops_the_embedded_run_before_anything_is_written(case: Bad, tmp_path: Path) -> None:
    """The submit's refusal (tests/test_bad_input_cli.py), word for word in its shape: one line
    naming the file, the line and the field; no output, no manifest (the model never loads)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(file_with(case.bad, at=case.at, openai=case.openai))
    out = tmp_path / "out.jsonl"
    result = run_embedded_cli(str(path), "-o", str(out), "--profile", PROFILE)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("genq: error: ")]
    assert len(errors) == 1, result.stderr
    where = [str(path), f"line {case.at}"] + ([f"field '{case.field}'"] if case.field else [])
    assert errors[0].startswith("genq: error: " + ", ".join(where) + ": "), errors[0]
    assert all(w in errors[0] for w in case.words), errors[0]
    assert not out.exists() and not manifest_path(out).exists()


def test_a_bad_line_past_the_first_window_leaves_the_output_as_it_was(
    tiny_profile: Any, tmp_path: Path
) -> None:
    """An existing output and its manifest are left byte for byte when the input's line 40
    (the tenth window of 4) is bad: the whole input is read before anything is written."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"id":"a","status":"ok","text":"x"}\n')
    manifest_path(out).write_text('{"genq_manifest":1,"format":"native"}\n["a","d"]\n')
    before = (out.read_bytes(), manifest_path(out).read_bytes())
    records: list[Any] = [{"id": f"w{i}", "prompt": f"w {i}"} for i in range(50)]
    records[39] = {"id": "w39", "prompt": ""}
    src = write_jsonl(tmp_path / "in.jsonl", records)
    job = EmbeddedJob(JobBuilder(src, SubmitOptions(profile=tiny_profile)), "late-bad")
    with pytest.raises(InputError) as caught:
        run_embedded(job, out, profile=tiny_profile, mode="fp32", window=4)
    assert (caught.value.line, caught.value.field) == (40, "prompt")
    assert (out.read_bytes(), manifest_path(out).read_bytes()) == before


def test_skip_invalid_records_the_bad_line_in_its_place(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(file_with('{"prompt": 42}', at=3))
    out = tmp_path / "out.jsonl"
    genq(
        None, "run", str(src), "-o", str(out), "--profile", PROFILE, "--max-new-tokens", "1", "--skip-invalid"
    )
    got = rows(out)
    assert [r["id"] for r in got] == ["g1", "g2", "line-3", "g4", "g5"]
    assert got[2]["status"] == "error" and got[2]["error"]["type"] == "invalid_input"
    assert "line 3, field 'prompt'" in got[2]["error"]["message"]
    assert [r["status"] for r in got[:2] + got[3:]] == ["ok"] * 4
