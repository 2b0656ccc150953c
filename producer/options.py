"""A job's options and its id: what, besides the input, makes a job (no Redis, no Celery)."""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from producer.inputs import InputLimits
from worker.core.errors import InputError
from worker.core.profiles import Profile
from worker.core.schema import GenParams, JobSpec, unset_new_fields
from worker.core.states import Priority, QueueMode


@dataclass(frozen=True)
class SubmitOptions:
    profile: Profile
    mode: QueueMode = QueueMode.ANY
    chunk_size: int = 16
    params: GenParams = field(default_factory=GenParams)
    system_prompt: str | None = None
    expires_in: float | None = None
    skip_invalid: bool = False
    adapter: str | None = None
    """The job's adapter, by a name the profile lists (``--adapter``): items that name none run
    with it.  None: the profile's default."""
    priority: Priority = Priority.NORMAL
    """Not part of the derived id: a resubmit of the same input at another priority finds the same
    job, and is refused (naming ``--priority``) rather than moving it to another queue level."""

    def check(self) -> None:
        if self.chunk_size < 1:
            raise InputError("chunk size must be at least 1", field="chunk_size")
        if self.expires_in is not None and not (math.isfinite(self.expires_in) and self.expires_in > 0):
            raise InputError(
                f"--expires-in must be a positive number of seconds, got {self.expires_in}",
                field="expires_in",
            )
        if self.adapter is not None:
            try:
                self.profile.check_adapter(self.adapter)
            except ValueError as exc:
                raise InputError(f"--adapter: {exc}", field="adapter") from None
        limit = self.profile.limits.max_new_tokens
        mnt = self.params.max_new_tokens
        if mnt is not None and mnt > limit:
            raise InputError(
                f"max_new_tokens {mnt} is above the profile's limit of {limit}", field="max_new_tokens"
            )

    def spec(
        self,
        job_id: str,
        *,
        total: int,
        source: str | None = None,
        input_digest: str = "",
        source_fingerprint: str = "",
    ) -> JobSpec:
        """The job's spec: the one way a job is built from its options, for `genq submit` and
        `genq run` (embedded or not) alike (:class:`producer.build.JobBuilder` calls it)."""
        return JobSpec(
            job_id=job_id,
            profile=self.profile.name,
            mode=self.mode,
            priority=self.priority,
            chunk_size=self.chunk_size,
            total=total,
            defaults=self.params,
            system_prompt=self.system_prompt,
            expires_at=(time.time() + self.expires_in) if self.expires_in is not None else None,
            input_digest=input_digest,
            source=source,
            source_fingerprint=source_fingerprint,
            skip_invalid=self.skip_invalid,
        )

    def fingerprint(self) -> str:
        """What, besides the input's bytes, makes a different job (the expiry and the priority
        do not)."""
        return "|".join(
            [
                self.profile.name,
                str(self.mode),
                str(self.chunk_size),
                self.params.model_dump_json(exclude=unset_new_fields(params=self.params)),
                self.system_prompt or "",
                str(self.skip_invalid),
            ]
            + ([f"adapter={self.adapter}"] if self.adapter is not None else [])
        )


def option_difference(stored: JobSpec, options: SubmitOptions) -> str | None:
    """The first option in which ``options`` differ from the job ``stored`` was submitted with,
    as that job was given it (``--chunk-size 16``), or None when none differs.  The deadline
    (``--expires-in``) is not compared: a resumed job keeps its first one."""
    checks: list[tuple[bool, str]] = [
        (stored.profile == options.profile.name, f"--profile {stored.profile}"),
        (stored.mode == options.mode, f"--mode {stored.mode}"),
        (stored.chunk_size == options.chunk_size, f"--chunk-size {stored.chunk_size}"),
        (
            stored.skip_invalid == options.skip_invalid,
            "--skip-invalid" if stored.skip_invalid else "no --skip-invalid",
        ),
        (stored.priority == options.priority, f"--priority {stored.priority}"),
        (stored.defaults == options.params, "other generation parameters (--max-new-tokens, ...)"),
        (stored.system_prompt == options.system_prompt, "another --system-prompt"),
    ]
    return next((name for same, name in checks if not same), None)


def new_job_id() -> str:
    return time.strftime("j%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (a few hundred MB a second; read in 1 MiB blocks)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    except OSError:
        return ""  # the reader reports the problem with the file in its own words
    return h.hexdigest()


def source_fingerprint(path: str | os.PathLike[str], options: SubmitOptions) -> str:
    """The file's bytes and the job's options, hashed: equal for the same submit."""
    return hashlib.sha256(f"{file_digest(path)}|{options.fingerprint()}".encode()).hexdigest()


def derived_job_id(
    path: str | os.PathLike[str], options: SubmitOptions, *, fingerprint: str | None = None
) -> str:
    """The same file (by content), profile and parameters give the same job id (``fingerprint``:
    :func:`source_fingerprint`, when the caller has it already)."""
    digest = (fingerprint or source_fingerprint(path, options))[:12]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(path).stem)[:40] or "job"
    return f"{stem}-{digest}"


def input_limits(profile: Profile, adapter: str | None = None) -> InputLimits:
    """What the reader enforces for this profile (and a job naming ``adapter``)."""
    return InputLimits(
        max_new_tokens=profile.limits.max_new_tokens,
        max_n=profile.limits.max_n,
        adapters=tuple(profile.named_adapters),
        adapter=adapter,
    )
