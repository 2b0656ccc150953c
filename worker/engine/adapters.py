"""Several LoRA adapters in one batch: each row of a forward pass through its own adapter.

A model loaded with several unmerged adapters (:mod:`worker.model.adapters`) has a peft LoRA
layer in place of every adapted projection.  Such a layer takes ``adapter_names`` — one name per
row of its input — and adds to each row the product of that row's adapter only (peft's
``_mixed_batch_forward``: the base projection once for all rows, then each adapter's A and B on
its own rows).  ``PeftModel.forward`` passes the names in through forward pre-hooks on those
layers; the engine calls the model below ``PeftModel.forward`` (with its own cache and masks), so
:class:`AdapterRouter` installs such hooks once, and :meth:`AdapterRouter.rows` says, for one
pass, which adapter each row uses.  The same works for prefill passes (rows × tokens) and decode
steps (rows × 1): the LoRA layers only index the first dimension.

A pass whose rows all use one adapter skips the per-row path: that adapter is made the layers'
active one for the pass (peft's plain unmerged forward, no gathering of rows).  Outside
:meth:`AdapterRouter.rows` (autotune, a model with one adapter) the layers run as peft runs them:
the active adapter — the profile's default — for every row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers of ``model`` (none for a model without unmerged adapters)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class AdapterRouter:
    """Per-row adapter names for every LoRA layer of one model (see the module)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.default = self.names[0]
        self.current: list[str] | None = None
        self.active = self.default
        """The adapter the layers apply to every row when no per-row names are passed."""
        self.layers = lora_layers(model)
        self.passes = 0
        """Forward passes that ran with per-row adapters (for tests and logs)."""
        self._handles = [
            layer.register_forward_pre_hook(self._inject, with_kwargs=True) for layer in self.layers
        ]

    def _inject(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        if self.current is not None:
            kwargs["adapter_names"] = self.current
        return args, kwargs

    @contextmanager
    def rows(self, adapters: Sequence[str | None] | None) -> Iterator[None]:
        """Within this block, row ``r`` of every pass uses adapter ``adapters[r]``."""
        if adapters is None or not self.layers:
            yield
            return
        unknown = {a for a in adapters if a not in self.names}
        if unknown:
            raise ValueError(f"adapters {sorted(map(str, unknown))} are not loaded ({', '.join(self.names)})")
        names = [str(a) for a in adapters]
        self.passes += 1
        if len(set(names)) == 1:  # one adapter for the whole pass: peft's plain path, no gathering
            self._activate(names[0])
            try:
                yield
            finally:
                self._activate(self.default)
            return
        self.current = names
        try:
            yield
        finally:
            self.current = None

    def _activate(self, name: str) -> None:
        """Make ``name`` the adapter every LoRA layer applies (what ``set_adapter`` does to the
        layers, without touching ``requires_grad``, which inference does not need)."""
        if name == self.active:
            return
        for layer in self.layers:
            setattr(layer, "_active_adapter", name)  # noqa: B010 - peft keeps it untyped
        self.active = name

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
