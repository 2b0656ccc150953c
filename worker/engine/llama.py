"""The engine's own pass through a Llama-family decoder (Llama, Qwen2, Mistral) over the slot cache.

transformers runs a decoder layer as ~35 tensor operations behind several Python wrappers (the
model's and each layer's ``forward``, output capture, mask preparation, the attention interface):
on a CPU, where each operation of a 64-row decode step is a few microseconds of work inside a
parallel region, that fixed cost is a share of the step.  :class:`LlamaPass` computes the same
layers with fewer operations and no wrappers:

* the query, key and value projections as one product (the fused packed weight of
  :class:`worker.engine.cpu.FusedLinear`), the rotary embedding applied to the queries and keys
  together, from views of that one output;
* the sine's sign folded in once per pass (``rotate_half(x) · sin`` is ``cat(x₂, x₁) · (−sin₁, sin₂)``,
  exactly: a sign flip rounds nothing), so the rotation is one concatenation and three products;
* residuals, the norm's scale and the activation's product in place;
* keys and values written straight into the slots (:meth:`SlotCache.write`) from the
  ``[rows, tokens, heads, head size]`` layout the projection gives, and decode attention per run
  of rows of similar length (:mod:`worker.engine.attention`);
* the output head on the last position only.

Every operation is the one transformers applies, in the same order, with the same operands
(``a·b`` for ``b·a``, ``a + b`` for ``b + a`` being exact), so the logits equal the transformers
pass's bit for bit (tests/test_llama_pass.py).  :func:`llama_pass` says when a model fits: one of
those families, default or scaled rotary, no sliding window, no unmerged adapter layers, every
projection a :class:`torch.nn.Linear` (packed or not); anything else runs transformers' own pass.
``GENQ_OWN_PASS=0`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import silu
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine.attention import Chunk, chunked_attention
from worker.engine.cpu import PackedLinear
from worker.engine.slot_cache import Segment, SlotCache, segment_visibility

FAMILIES = ("llama", "qwen2", "mistral")
"""``config.model_type`` values whose decoder layers :class:`LlamaPass` computes."""


def _fused_product(members: Sequence[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The outputs of ``members`` (linear layers reading ``x``) side by side: one product where
    they share a :class:`FusedLinear` and it applies to ``x``, else each layer's own."""
    first = members[0]
    if isinstance(first, PackedLinear) and first.fused is not None and x.device.type == "cpu":
        group = first.fused
        if group.members == list(members) and x.numel() <= first.packed_max_rows * first.in_features:
            return group.whole(x)
    return torch.cat([m(x) for m in members], dim=-1)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (fp32 throughout here): ``weight · (x · rsqrt(mean(x²) + eps))``."""
    scale = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (x * scale).mul_(weight)


@dataclass(frozen=True)
class _Layer:
    norm_in: torch.Tensor
    eps_in: float
    qkv: tuple[torch.nn.Module, ...]
    o_proj: torch.nn.Module
    norm_post: torch.Tensor
    eps_post: float
    gate_up: tuple[torch.nn.Module, ...]
    down: torch.nn.Module
    attn: torch.nn.Module
    """The attention module (what transformers' sdpa function reads its settings from)."""


_Attend = Callable[[_Layer, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A pass's attention: (layer, queries ``[rows, tokens, heads, head size]``, the pass's key and
value slots ``[rows, key heads, span, head size]``) → ``[rows, tokens, heads, head size]``."""


class LlamaPass:
    """One forward pass of a Llama-family causal LM over a :class:`SlotCache` (see the module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        decoder: Any = model.model
        config: Any = model.config
        self.embed: torch.nn.Module = decoder.embed_tokens
        self.rotary: torch.nn.Module = decoder.rotary_emb
        self.final_norm: torch.Tensor = decoder.norm.weight
        self.final_eps = float(decoder.norm.variance_epsilon)
        self.head: torch.nn.Module = model.lm_head  # type: ignore[assignment]
        first = decoder.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.scaling = float(first.scaling)
        self.layers = [
            _Layer(
                norm_in=layer.input_layernorm.weight,
                eps_in=float(layer.input_layernorm.variance_epsilon),
                qkv=(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                o_proj=layer.self_attn.o_proj,
                norm_post=layer.post_attention_layernorm.weight,
                eps_post=float(layer.post_attention_layernorm.variance_epsilon),
                gate_up=(layer.mlp.gate_proj, layer.mlp.up_proj),
                down=layer.mlp.down_proj,
                attn=layer.self_attn,
            )
            for layer in decoder.layers
        ]

    def __call__(
        self,
        ids: torch.Tensor,
        visible: torch.Tensor,
        positions: torch.Tensor,
        cache: SlotCache,
        *,
        last_only: bool = False,
        chunks: Sequence[Chunk] | None = None,
    ) -> torch.Tensor:
        """The logits ``[rows, vocab]`` (float) of each row's last position.  ``visible``: the 4-D
        bool visibility the cache's pass returned; ``chunks``: a decode pass's runs of rows, each
        attended over its own span (None: every row over the pass's span, under ``visible``).
        ``last_only`` is the caller's (transformers' ``logits_to_keep=1``): the head runs on the
        last position here always."""
        decode = ids.shape[1] == 1 and chunks is not None

        def attend(layer: _Layer, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
            if decode:
                return chunked_attention(query[:, 0], keys, values, visible, chunks or (), self.scaling)
            out, _ = sdpa_attention_forward(
                layer.attn, query.transpose(1, 2), keys, values, visible, scaling=self.scaling
            )
            return out

        x = self._layers(ids, positions, cache, attend)
        # the norm over every position, then the last one's slice, as transformers does: the head's
        # product then reads the same strided input, so BLAS takes the same path
        x = _norm(x, self.final_norm, self.final_eps)[:, -1:]
        return self.head(x)[:, -1, :].float()

    def packed(
        self, ids: torch.Tensor, positions: torch.Tensor, segments: Sequence[Segment], cache: SlotCache
    ) -> torch.Tensor:
        """A prefill pass whose rows lie end to end in one row of ``ids`` ``[1, tokens]``, no
        padding (:meth:`SlotCache.begin_packed`): every product runs over the real tokens only,
        attention per row over its own keys.  The logits ``[rows, vocab]`` (float) of each
        segment's last token."""
        # a row with nothing before it is plain causal attention: no mask, so sdpa takes its causal
        # kernel and reads the key heads shared (no copies per query head): the same bits, ~20 %
        # less time than the same attention under a mask (docs/BENCHMARKS.md)
        masks = [segment_visibility(s) if s.start else None for s in segments]

        def attend(layer: _Layer, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
            outs = []
            for s, mask in zip(segments, masks, strict=True):
                span = s.start + s.tokens
                out, _ = sdpa_attention_forward(
                    layer.attn,
                    query[:, s.first : s.first + s.tokens].transpose(1, 2),
                    keys[s.row : s.row + 1, :, :span],
                    values[s.row : s.row + 1, :, :span],
                    mask,
                    scaling=self.scaling,
                )
                outs.append(out)
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

        x = self._layers(ids, positions, cache, attend)
        last = torch.tensor([s.first + s.tokens - 1 for s in segments], dtype=torch.long)
        return self.head(_norm(x[0, last], self.final_norm, self.final_eps)).float()

    def _layers(self, ids: Tensor, positions: Tensor, cache: SlotCache, attend: _Attend) -> Tensor:
        """The decoder layers over ``ids`` ``[rows, tokens]``, keys and values written into
        ``cache``, attention by ``attend`` (the queries ``[rows, tokens, heads, head size]`` and
        the pass's slots): the last layer's output, before the final norm."""
        rows, tokens = ids.shape
        h, d, kv = self.heads, self.head_dim, self.kv_heads
        x = self.embed(ids)
        cos, sin = self.rotary(x, positions)
        half = d // 2
        cos = cos[:, :, None, :]
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None, :]
        for index, layer in enumerate(self.layers):
            y = _norm(x, layer.norm_in, layer.eps_in)
            qkv = _fused_product(layer.qkv, y)
            qk = qkv[..., : (h + kv) * d].view(rows, tokens, h + kv, d)
            value = qkv[..., (h + kv) * d :].view(rows, tokens, kv, d)
            turned = torch.cat((qk[..., half:], qk[..., :half]), dim=-1).mul_(sin)
            qk = (qk * cos).add_(turned)
            keys, values = cache.write(index, qk[:, :, h:], value)
            out = attend(layer, qk[:, :, :h], keys, values)
            x = layer.o_proj(out.reshape(rows, tokens, h * d)).add_(x)
            y = _norm(x, layer.norm_post, layer.eps_post)
            gate_up = _fused_product(layer.gate_up, y)
            inner = gate_up.shape[-1] // 2
            act = silu(gate_up[..., :inner]).mul_(gate_up[..., inner:])
            x = layer.down(act).add_(x)
        return x


def llama_pass(model: torch.nn.Module) -> LlamaPass | None:
    """A :class:`LlamaPass` for ``model`` when it is one the pass computes exactly, else None.
    The caller checks the attention first (:func:`worker.engine.forward.fast_attention` is
    ``sdpa``: no sliding window, every layer full attention)."""
    config: Any = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAMILIES:
        return None
    decoder: Any = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not layers or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) > 1:
        return None
    if not all(hasattr(decoder, n) for n in ("embed_tokens", "rotary_emb", "norm")):
        return None
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attn, n) for n in ("head_dim", "scaling", "num_key_value_groups")):
            return None
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(p) in (torch.nn.Linear, PackedLinear) for p in projections):
            return None  # adapter layers, quantised layers, anything else: transformers' pass
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if not all(hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms):
            return None
    if not hasattr(decoder.norm, "variance_epsilon"):
        return None
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return None
    return LlamaPass(model)
