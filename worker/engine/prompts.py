"""From an item to the token ids the model reads: chat template, system prompt, limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from worker.core.errors import ContextLengthExceeded, InputError
from worker.core.schema import GenParams, Item, chat_messages


class Tokenizer(Protocol):
    """What the engine uses of a Hugging Face tokenizer."""

    pad_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, tokenize: bool
    ) -> Any: ...


@dataclass
class Prepared:
    """An item, tokenised, with its parameters resolved."""

    item: Item
    ids: list[int]
    params: GenParams
    max_new: int
    clipped: bool
    """``max_new`` was cut to fit the context: running out of it is ``length``."""
    prefix: int = 0
    """How many leading ids this item shares with others of its batch (their keys and values are
    computed once: :mod:`worker.engine.prefix`); 0: none."""
    adapter: str | None = None
    """The adapter this item runs with, by name (None: the model has no adapter)."""


class Prompts:
    """Renders and tokenises items for one model and profile."""

    def __init__(
        self, tokenizer: Tokenizer, *, context_length: int, profile: str, defaults: GenParams
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.profile = profile
        self.defaults = defaults

    def render(self, item: Item, system_prompt: str | None = None) -> tuple[str, bool]:
        """The text to tokenise, and whether it already contains the special tokens.  Chat messages,
        or a plain prompt with a system prompt, go through the chat template; a system prompt is
        added in front unless the messages have their own."""
        messages = chat_messages(item, system_prompt)
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return str(text), True
        return item.prompt or "", False

    def prepare(
        self, item: Item, job_params: GenParams | None = None, system_prompt: str | None = None
    ) -> Prepared:
        """``item`` tokenised, its parameters resolved (item, then job, then profile), its token
        budget cut to the context.  Raises :class:`ContextLengthExceeded` or
        :class:`InputError` for an item that cannot run."""
        params = item.params.over(job_params or GenParams()).over(self.defaults)
        text, templated = self.render(item, system_prompt)
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        context = self.context_length
        if not ids:
            raise InputError("the prompt is empty after tokenisation", field="prompt")
        if len(ids) >= context:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens; the context of {self.profile} is {context} "
                "tokens, and at least one is needed for the completion"
            )
        wanted = int(params.max_new_tokens or 1)
        max_new = min(wanted, context - len(ids))
        return Prepared(item=item, ids=list(ids), params=params, max_new=max_new, clipped=max_new < wanted)
