"""The model's forward pass as the decoders call it: inputs, masks, the cache keyword, devices."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers.cache_utils import Cache

from worker.engine.adapters import AdapterRouter
from worker.engine.attention import slot_attention_on
from worker.engine.llama import LlamaPass
from worker.engine.slot_cache import Segment, SlotCache


def cache_keyword(model: torch.nn.Module) -> str:
    """transformers 5 calls the KV cache argument ``cache``; 4.x called it ``past_key_values``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def fast_attention(model: torch.nn.Module) -> str | None:
    """``sdpa`` or ``eager`` when the slot cache and a 4-D mask express this model's attention."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return None
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    return str(impl)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when a ``device_map`` hook manages
    it (its weights may sit on the CPU or on ``meta`` while it runs on a GPU), else its first
    parameter's device; the CPU for a module without parameters or on ``meta``."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return torch.device("cpu")
    return param.device


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model reads its inputs: the device of its token embedding."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, torch.nn.Module):
        return module_device(embeddings)
    return module_device(model)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


class Forward:
    """Calls one model: inputs moved to the embedding's device, masks in the form its attention
    takes, the logits of the last position."""

    def __init__(self, model: torch.nn.Module, *, pad_id: int, device: torch.device | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.device = device or input_device(model)
        """Where inputs, positions and masks go: the token embedding's device."""
        self.cache_kw = cache_keyword(model)
        self.attention = fast_attention(model)
        """``sdpa``/``eager`` when the slot cache and custom masks apply, else None (plain loop)."""
        self.dtype = compute_dtype(model)
        self.router: AdapterRouter | None = None
        """Per-row adapters when the model has several unmerged ones (set by the engine)."""
        self.live_span = True
        """Decode passes over a slot cache attend each run of rows over its own span only
        (:mod:`worker.engine.attention`; sdpa models); off: every row up to the longest row."""
        self.own: LlamaPass | None = None
        """The engine's own pass for slot-cache passes of a Llama-family model (set by the engine
        where :func:`worker.engine.llama.llama_pass` fits the model); None: transformers' pass."""
        self.pack_prefill = True
        """Prefill passes through the own pass lay their rows end to end, unpadded (:meth:`packed`);
        off: left-padded side by side, as transformers' pass takes them (benchmarks compare)."""

    @property
    def packs(self) -> bool:
        """Whether prefill passes go through :meth:`packed`."""
        return self.pack_prefill and self.own is not None and self.attention == "sdpa"

    def packed(
        self, ids: torch.Tensor, positions: torch.Tensor, segments: Sequence[Segment], cache: SlotCache
    ) -> torch.Tensor:
        """The logits ``[rows, vocab]`` (float) of each row's last token in a packed prefill pass
        (:meth:`SlotCache.begin_packed`); only where :attr:`packs`."""
        if self.own is None:
            raise RuntimeError("packed prefill needs the engine's own pass")
        return self.own.packed(ids, positions, segments, cache)

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        *,
        last_only: bool = False,
        adapters: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """The logits of each row's last position, [rows, vocab], as float, on the device of the
        output head.  ``mask`` is a 2-D padding mask, or a 4-D visibility (bool, True: attend)
        such as :class:`SlotCache` passes return, turned here into what the attention takes.
        ``adapters``: each row's adapter (models with several; ignored otherwise)."""
        own = self.own
        if (
            own is not None
            and self.attention == "sdpa"
            and isinstance(cache, SlotCache)
            and mask.dim() == 4
            and mask.dtype == torch.bool
        ):
            chunks = cache.chunks if self.live_span else None
            return own(ids, mask, positions, cache, last_only=last_only, chunks=chunks)
        extra: dict[str, Any] = {"logits_to_keep": 1} if last_only else {}
        if mask.dim() == 4 and mask.dtype == torch.bool:
            mask = self.attend(mask)
        routed = self.router.rows(adapters) if self.router is not None else nullcontext()
        chunks = getattr(cache, "chunks", None) if self.live_span and self.attention == "sdpa" else None
        if chunks is not None:
            extra["slot_chunks"] = chunks
        spans = slot_attention_on(self.model) if chunks is not None else nullcontext()
        with routed, spans:
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                **extra,
                **{self.cache_kw: cache},
            )
        return out.logits[:, -1, :].float()

    def left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids, 2-D attention mask and positions of ``prompts``, padded on the left."""
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def attend(self, visible: torch.Tensor) -> torch.Tensor:
        """A 4-D visibility on the input device as the attention takes it: bool for sdpa,
        additive (0 or the dtype's minimum) for eager."""
        visible = visible.to(self.device)
        if self.attention != "eager":
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min
        )

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
