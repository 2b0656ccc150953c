"""What an engine needs for the OpenAI request fields beyond plain sampling (structured output,
logprobs, ``n``, penalties), attached in one call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.engine.constraints import Constraints
from worker.engine.shaping import Shaper

if TYPE_CHECKING:
    from worker.engine.scheduler import Engine


def model_name(extra: dict[str, Any], fallback: str) -> str:
    """``base`` or ``base:adapter`` as the loader resolved them (the profile's name otherwise)."""
    base = extra.get("base_model")
    if not base:
        return fallback
    adapter = extra.get("adapter_model")
    return f"{base}:{adapter}" if adapter else str(base)


def vocab_size(model: Any, tokenizer: Any) -> int:
    """The width of the model's logits (it may exceed the tokenizer's size)."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, int) else len(tokenizer)


def attach_requests(engine: Engine) -> None:
    """Give ``engine``'s row rules a :class:`Shaper` (built lazily where it costs anything) and
    its results the model's name."""
    loaded = engine.loaded
    constraints = Constraints(
        engine.tokenizer, vocab_size(engine.model, engine.tokenizer), loaded.eos_token_ids
    )
    engine.rules.shaper = Shaper(constraints)
    engine.results.model = model_name(loaded.extra, loaded.profile.name)
    if loaded.profile.multi_adapter:
        base = loaded.extra.get("base_model") or loaded.profile.name
        engine.results.models = {name: f"{base}:{ident}" for name, ident in loaded.adapters.items()}
        engine.results.record_adapter = True
