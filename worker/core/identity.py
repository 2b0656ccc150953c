"""What a job and each of its items are made of: digests that decide what a rerun may reuse.

An item's digest covers its id, its request (prompt or messages, every generation parameter) and
the job context that shapes its answer: the profile (its name, base model, adapter and their
revisions, its generation defaults), the job's default parameters and system prompt.  Moving a
line (its index or line number) does not change it; changing anything that could change the
answer does.  A rerun reuses an answer only when the digests are equal.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from worker.core.profiles import Profile
from worker.core.schema import GenParams, Item, unset_new_fields

DIGEST_CHARS = 32
"""Hex characters kept of each SHA-256 (128 bits)."""


def job_context(profile: Profile, params: GenParams, system_prompt: str | None) -> str:
    """Canonical JSON of everything outside an item that shapes its answer."""
    model: dict[str, Any] = {
        "profile": profile.name,
        "base": profile.base,
        "base_revision": profile.base_revision,
        "adapter": profile.adapter,
        "adapter_revision": profile.adapter_revision,
        "tiny": profile.tiny,
        "generation": _params_json(profile.generation),
    }
    if profile.adapters is not None:  # several adapters: each one, and which answers by default
        model["adapters"] = {k: v.model_dump(mode="json") for k, v in profile.adapters.items()}
        model["default_adapter"] = profile.default_adapter_name
    blob = {"model": model, "params": _params_json(params), "system_prompt": system_prompt}
    return json.dumps(blob, sort_keys=True, separators=(",", ":"))


def _params_json(params: GenParams) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude=unset_new_fields(params=params))


def item_digest(item: Item, context: str) -> str:
    """The digest of one item's request in ``context`` (see :func:`job_context`)."""
    request = item.model_dump_json(exclude={"index": True, "line": True, **unset_new_fields(item)})
    return hashlib.sha256(f"{context}\n{request}".encode()).hexdigest()[:DIGEST_CHARS]


class JobDigest:
    """The digest of a whole job: its context and every item, in order (streamed)."""

    def __init__(self, context: str) -> None:
        self._h = hashlib.sha256(context.encode())

    def add(self, item_json: str) -> None:
        self._h.update(b"\n")
        self._h.update(item_json.encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:DIGEST_CHARS]
