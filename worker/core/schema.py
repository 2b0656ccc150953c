"""Job items, generation parameters, results and job records (pydantic; never imports torch).

This module is the wire contract between the producer, the job store and the workers.  Everything
that crosses Redis is one of these models serialised as JSON.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

from worker.core.states import FinishReason, ItemStatus, Mode, Priority, QueueMode
from worker.core.structured import MAX_N, MAX_TOP_LOGPROBS, Choice, ResponseFormat, TokenLogprob

MAX_STOP_SEQUENCES = 16
REQUEST_FIELDS = frozenset(
    {"response_format", "logprobs", "top_logprobs", "n", "presence_penalty", "frequency_penalty"}
)
"""GenParams fields of issue 14, left out of digests when unset (:func:`unset_new_fields`)."""
RESULT_FIELDS = frozenset({"model", "logprobs", "json_valid", "choices", "adapter"})
"""ItemResult fields of issue 14, left out of the JSON when unset."""
ITEM_FIELDS = frozenset({"adapter"})
"""Item fields of issue 15, left out of digests when unset (:func:`unset_new_fields`).

Items and parameters have no custom serializer: a Python serializer per model costs a million-item
submit seconds (4.8 µs an item against 1), and one running when Ctrl-C lands turns the
KeyboardInterrupt into pydantic's serialisation error.  Stored items leave defaults out anyway
(``exclude_defaults``); only digests must leave the newer fields out explicitly."""
MAX_ID_LENGTH = 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenParams(_Strict):
    """Generation parameters.  ``None`` means "use the job's, else the profile's default"."""

    max_new_tokens: Annotated[StrictInt, Field(gt=0)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    seed: StrictInt | None = None
    stop: list[StrictStr] | None = None

    # --- OpenAI request fields (issue 14; worker/core/structured.py) ---------------------------
    response_format: ResponseFormat | None = None
    """JSON output enforced while decoding (``json_object`` or ``json_schema``)."""
    logprobs: StrictBool | None = None
    """Return each generated token's log-probability."""
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """With ``logprobs``: also the most likely alternatives at each position."""
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    """Samples per item, each with its own seed (:func:`worker.core.structured.sample_seed`)."""
    presence_penalty: Annotated[StrictFloat | StrictInt, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictFloat | StrictInt, Field(ge=-2, le=2)] | None = None
    """OpenAI's penalties on tokens already generated: ``logit -= count × frequency_penalty +
    (count > 0) × presence_penalty``."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_entries(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError("seed must be between 0 and 2**63 - 1")
        return value

    def over(self, base: GenParams) -> GenParams:
        """These parameters, with unset ones taken from ``base``."""
        merged = base.model_dump()
        merged.update({k: v for k, v in self.model_dump().items() if v is not None})
        return GenParams(**merged)


PARAM_FIELDS: tuple[str, ...] = tuple(GenParams.model_fields)


def unset_new_fields(item: Item | None = None, params: GenParams | None = None) -> dict[str, Any]:
    """The ``exclude`` that leaves unset newer fields (:data:`REQUEST_FIELDS`, :data:`ITEM_FIELDS`)
    out of a dump of ``item`` (or of ``params`` alone), so that digests and derived job ids of
    requests made before those fields existed stay the same."""
    if item is not None:
        params = item.params
    assert params is not None
    unset: dict[str, Any] = {f: True for f in REQUEST_FIELDS if getattr(params, f) is None}
    if item is None:
        return unset
    out: dict[str, Any] = {f: True for f in ITEM_FIELDS if getattr(item, f) is None}
    if unset:
        out["params"] = unset
    return out


def _omit_none(data: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """``data`` without the ``fields`` that are None: items, results and digests made before
    these fields existed keep their exact JSON (and a million stored items no null keys)."""
    return {k: v for k, v in data.items() if not (k in fields and v is None)}


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ErrorInfo(_Strict):
    type: str
    message: str


class Item(_Strict):
    """One input, as stored in the job store.  ``index`` is its 0-based position in the job and
    ``line`` its 1-based line in the submitted file (0 when submitted through the API)."""

    index: StrictInt
    id: StrictStr
    line: StrictInt = 0
    prompt: StrictStr | None = None
    messages: list[Message] | None = None
    params: GenParams = GenParams()
    invalid: ErrorInfo | None = None
    """Set for lines accepted with ``--skip-invalid``: recorded as errored, never generated."""
    adapter: StrictStr | None = None
    """The profile's adapter that answers this item, by name (the item's own ``adapter``, else the
    job's ``--adapter``, resolved at submit); None: the profile's default adapter."""

    @model_validator(mode="after")
    def _one_input(self) -> Item:
        if self.invalid is None and (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        return self


class Usage(_Strict):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ItemResult(_Strict):
    """The outcome of one item.  ``status == 'error'`` carries ``error`` instead of ``text``."""

    index: int
    id: str
    line: int = 0
    status: ItemStatus
    text: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage = Usage()
    profile: str | None = None
    mode: Mode | None = None
    worker: str | None = None
    attempts: int = 1
    latency_ms: float | None = None
    error: ErrorInfo | None = None

    # --- OpenAI request fields (issue 14; worker/core/structured.py) ---------------------------
    model: str | None = None
    """The base model that answered, with its adapter (``base:adapter``)."""
    logprobs: list[TokenLogprob] | None = None
    """With ``logprobs``: one entry per generated token."""
    json_valid: bool | None = None
    """With a JSON ``response_format``: true when the text is complete JSON that satisfies the
    schema (the constraint guarantees it for ``finish_reason: stop``), false when ``max_tokens``
    or a stop string cut it short."""
    adapter: str | None = None
    """The profile's adapter that answered, by name (profiles with several ``adapters``, or an item
    that named one)."""
    choices: list[Choice] | None = None
    """With ``n`` > 1: every sample; ``text``, ``finish_reason``, ``logprobs`` and ``json_valid``
    then describe sample 0 (for the Python API) and the native row carries only ``choices``."""

    @model_serializer(mode="wrap")
    def _omit_unset_request_fields(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        return _omit_none(handler(self), RESULT_FIELDS)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error_type(self) -> str | None:
        return self.error.type if self.error else None

    def public(self) -> dict[str, Any]:
        """The native output row: what `genq collect` writes (no internal index)."""
        row = self.model_dump(exclude={"index"}, exclude_none=True)
        if self.status == "error":
            row.pop("text", None)
            row.pop("finish_reason", None)
        if self.choices is not None:  # n > 1: the samples, once each
            for key in ("text", "finish_reason", "logprobs", "json_valid"):
                row.pop(key, None)
        return row


def error_result(item: Item, error: ErrorInfo, **extra: Any) -> ItemResult:
    return ItemResult(
        index=item.index, id=item.id, line=item.line, status=ItemStatus.ERROR, error=error, **extra
    )


class JobSpec(_Strict):
    """What a job is: fixed at submit time, stored once."""

    job_id: str
    profile: str
    mode: QueueMode = QueueMode.ANY
    priority: Priority = Priority.NORMAL
    """Which of the profile's queues its chunks go to (not part of a derived job id: a resubmit
    with another priority finds the same job and is refused, naming ``--priority``)."""
    chunk_size: Annotated[int, Field(gt=0)] = 16
    total: int
    defaults: GenParams = GenParams()
    system_prompt: str | None = None
    created_at: float = Field(default_factory=time.time)
    expires_at: float | None = None
    input_digest: str = ""
    source: str | None = None
    source_fingerprint: str = ""
    """A file job's bytes and options, hashed: a resubmit of the same file with the same options
    is recognised without reading the file again."""
    skip_invalid: bool = False
    """Submitted with ``--skip-invalid`` (a resubmit without it is refused, and the reverse)."""
    incarnation: str = ""
    """Which life of this job id (set when the submit begins): a job id deleted and submitted
    again is a new incarnation, and nothing of the old one acts on it (worker.core.lifecycle)."""


class Counts(BaseModel):
    total: int = 0
    succeeded: int = 0
    errored: int = 0
    cancelled: int = 0
    expired: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.errored + self.cancelled + self.expired

    @property
    def pending(self) -> int:
        return max(self.total - self.finished, 0)

    def as_dict(self) -> dict[str, int]:
        return {**self.model_dump(), "pending": self.pending}


class ChunkRef(_Strict):
    """The body of a task message: which items of which job.  Never carries prompts."""

    job_id: str
    chunk_id: str
    indices: list[int]
    inc: str = ""
    """The job's incarnation this chunk belongs to ('' : a message of an older genq, any)."""


def chat_messages(item: Item, system_prompt: str | None = None) -> list[dict[str, Any]] | None:
    """The messages the chat template renders for ``item``, or None when it is a plain prompt
    tokenised as it is (no messages, no system prompt).  A plain prompt with a system prompt
    becomes one user message; a system prompt goes in front unless the messages have their own.
    The worker (worker/engine/prompts.py) and ``genq estimate`` (producer/tokens.py) both render
    through this, so they count the same tokens."""
    if item.messages is None and not system_prompt:
        return None
    messages = (
        [m.model_dump() for m in item.messages]
        if item.messages is not None
        else [{"role": "user", "content": item.prompt or ""}]
    )
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
