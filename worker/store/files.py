"""Where `genq collect` wrote a job's results, kept in the job's hash (``output_file``,
``error_file``) so `genq status --format openai` can name them as OpenAI's Batch object does."""

from __future__ import annotations

from worker.store.base import StoreBase
from worker.store.keys import job_key

FILE_FIELDS = ("output_file", "error_file")


class OutputFiles(StoreBase):
    def record_files(self, job_id: str, *, output: str, errors: str | None) -> None:
        """Remember the files of the last collect (the job's hash keeps its TTL)."""
        mapping = {"output_file": output, "error_file": errors or ""}
        self._call(self.r.hset, job_key(job_id), mapping=mapping)

    def output_files(self, job_id: str) -> dict[str, str | None]:
        values = self._call(self.r.hmget, job_key(job_id), list(FILE_FIELDS))
        return {name: (value or None) for name, value in zip(FILE_FIELDS, values, strict=True)}
