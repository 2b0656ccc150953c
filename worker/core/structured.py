"""The OpenAI request fields beyond plain sampling, as genq stores them (no torch).

* :class:`ResponseFormat`: ``{"type": "text" | "json_object" | "json_schema", "json_schema":
  {"name", "schema", "description", "strict"}}`` as OpenAI defines it.  A ``json_object`` or
  ``json_schema`` answer is enforced while decoding (:mod:`worker.engine.constraints`), never
  checked afterwards; ``strict`` is accepted and changes nothing (genq always enforces).
* :class:`TokenLogprob`: one generated token's log-probability and its most likely
  alternatives, in the shape of OpenAI's chat ``logprobs.content`` entries.
* :class:`Choice`: one of ``n`` samples of an item.
* :func:`sample_seed`: the seed of sample ``k`` of an item whose seed is ``seed``.

Log-probabilities are those of the model's own distribution (the raw logits' log-softmax,
before temperature, penalties and the JSON constraint): what the model thought of the token.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator

from worker.core.states import FinishReason

MAX_N = 128
"""The most samples per item any profile may allow (OpenAI's own cap); profiles set their own
(``limits.max_n``)."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's cap on ``top_logprobs``."""
SCHEMA_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema``.  ``schema`` is stored under its own name (the Python
    attribute is ``schema_``, because pydantic models already have a ``schema`` method)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: Annotated[StrictStr, Field(pattern=SCHEMA_NAME)]
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """None: any JSON object (what OpenAI does without a schema)."""
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when 'type' is \"json_schema\"")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(
                f"'json_schema' is only allowed when 'type' is \"json_schema\", not {self.type!r}"
            )
        return self

    @property
    def constrained(self) -> bool:
        """Whether the answer must be JSON (``text`` is the unconstrained default)."""
        return self.type != "text"

    def target_schema(self) -> dict[str, Any]:
        """The JSON schema the answer must satisfy: ``{"type": "object"}`` for ``json_object``
        (and for a ``json_schema`` without a schema)."""
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return {"type": "object"}

    def key(self) -> str:
        """A digest of the schema: equal schemas share one compiled grammar in a worker."""
        blob = json.dumps(self.target_schema(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Strict):
    """One generated token: OpenAI's chat ``logprobs.content[i]``."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Choice(_Strict):
    """One sample of an item (``n`` > 1)."""

    index: int
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    json_valid: bool | None = None
    completion_tokens: int = 0

    @field_validator("index")
    @classmethod
    def _index(cls, value: int) -> int:
        if value < 0:
            raise ValueError("index must not be negative")
        return value


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of an item seeded with ``seed``: sample 0 keeps the item's seed
    (so ``n: 1`` and the first of ``n: 3`` agree); the others get distinct seeds derived from it,
    the same on every run."""
    if k == 0:
        return seed
    digest = hashlib.sha256(f"genq-sample:{seed}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
