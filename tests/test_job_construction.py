"""One way to build a job: `genq submit` and `genq run` (embedded too) take the spec from
:meth:`SubmitOptions.spec`, and the embedded run reads the profile once, from its caller: a
profile that no configs folder holds (as the caller loaded it) runs all the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from producer.build import EmbeddedJob, JobBuilder
from producer.options import SubmitOptions
from worker.core.schema import GenParams
from worker.core.states import Priority, QueueMode
from worker.local import run_embedded


def test_the_spec_carries_every_option(tiny_profile: Any) -> None:
    options = SubmitOptions(
        profile=tiny_profile,
        mode=QueueMode.FP32,
        chunk_size=3,
        params=GenParams(max_new_tokens=5),
        system_prompt="be brief",
        expires_in=60.0,
        priority=Priority.HIGH,
    )
    spec = options.spec("j1", total=7, source="in.jsonl", input_digest="d", source_fingerprint="f")
    assert (spec.profile, spec.mode, spec.priority, spec.chunk_size, spec.total) == (
        tiny_profile.name,
        "fp32",
        "high",
        3,
        7,
    )
    assert spec.defaults.max_new_tokens == 5 and spec.system_prompt == "be brief"
    assert spec.expires_at is not None and spec.expires_at > spec.created_at
    assert (spec.source, spec.input_digest, spec.source_fingerprint) == ("in.jsonl", "d", "f")


def test_the_embedded_run_reads_no_profile_of_its_own(tiny_profile: Any, tmp_path: Path) -> None:
    """Renamed, the profile exists only in this process: a run that loaded it again by name (it
    used to, twice) would stop with unknown_profile."""
    profile = tiny_profile.model_copy(update={"name": "tiny-only-in-memory"})
    options = SubmitOptions(profile=profile, chunk_size=2)
    records = [{"id": f"p{i}", "prompt": f"hello {i}", "max_new_tokens": 2} for i in range(3)]
    job = EmbeddedJob(JobBuilder(records, options), "j-once")
    report = run_embedded(job, tmp_path / "out.jsonl", profile=profile, mode="fp32")
    assert report.counts.succeeded == 3 and report.mode == "fp32"
