"""Counting an item's prompt tokens the way a worker will, without torch or transformers.

The worker renders chat messages (and a plain prompt with a system prompt) through the model's
chat template, then tokenises with the model's fast tokenizer (:mod:`worker.engine.prompts`).
Here the same ``tokenizer.json`` is read with the ``tokenizers`` package and the same template
is rendered with jinja2 in a sandbox, as transformers does it, so the counts agree with the
worker's ``usage.prompt_tokens`` (a test compares them on the tiny model).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from worker.core.errors import ConfigError
from worker.core.schema import Item, chat_messages


class PromptCounter:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(
                f"{folder} has no tokenizer.json: genq estimate reads fast tokenizers only "
                "(the same ones the workers use)"
            )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.special = {
            k: (v.get("content") if isinstance(v, dict) else v)
            for k, v in config.items()
            if k.endswith("_token") and isinstance(v, str | dict)
        }
        self.template = self._template(folder, config)

    @staticmethod
    def _template(folder: Path, config: dict[str, Any]) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text()
        if not source:
            return None

        def raise_exception(message: str) -> None:
            raise ConfigError(f"the chat template refused the messages: {message}")

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(source)

    def render(self, item: Item, system_prompt: str | None) -> tuple[str, bool]:
        """The text a worker tokenises and whether it came from the template (as
        :meth:`worker.engine.prompts.Prompts.render`)."""
        messages = chat_messages(item, system_prompt)
        if messages is None:
            return item.prompt or "", False
        if self.template is None:
            raise ConfigError("the model's tokenizer has no chat template, so chat items cannot be counted")
        return str(self.template.render(messages=messages, add_generation_prompt=True, **self.special)), True

    def count(self, item: Item, system_prompt: str | None = None) -> int:
        text, templated = self.render(item, system_prompt)
        return len(self.tokenizer.encode(text, add_special_tokens=not templated).ids)
