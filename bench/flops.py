"""What the roofline figure divides: the FLOPs a workload needs, and the best kernel this machine has.

``needed_flops`` counts every floating-point operation generating the items requires, and nothing
a particular implementation wastes (padding, recomputation): for an item with ``p`` prompt tokens
and ``g`` generated tokens, the model reads ``p + g - 1`` tokens (the last generated one is never
fed back), and

* the linear layers: ``2 · N · (p + g - 1)``, ``N`` the weights of the linear layers outside the
  output head (biases, norms and activations are a few FLOPs per hidden unit: not counted);
* attention (scores and weighted values, causal): ``4 · L · H · d`` per key attended, a token at
  position ``t`` attending ``t + 1`` keys: ``4 · L · H · d · Σ_{t=0}^{p+g-2} (t + 1)``;
* the vocabulary projection, once per generated token: ``2 · h · V · g``.

``kernel_peak`` is the best fp32 rate measured on this machine, in this process, with the same
threads: the larger of ``torch.mm`` on large shapes and oneDNN's prepacked linear (the path the
engine's decode steps take) on the model's own layer shapes.  No code path of the engine can beat
it, so a roofline fraction against it has a ceiling of 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

MATMUL_SHAPES = ((2048, 2048, 2048), (1024, 4096, 4096), (512, 1024, 2816), (256, 2816, 1024))
PACKED_ROWS = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Shape:
    """The model dimensions the FLOP count needs."""

    params: int
    """Weights of the linear layers outside the output head: one multiply-add each per token."""
    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> Shape:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            params=matmul_parameters(model),
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            head_dim=head_dim,
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
        )


def matmul_parameters(model: Any) -> int:
    """Weights of the linear layers, the output head aside."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and m.weight.device.type != "meta"
    )


def non_embedding_parameters(model: Any) -> int:
    """Parameters outside the token embedding and the output head."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or "embed_tokens" in name or "lm_head" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def needed_flops(shape: Shape, work: Iterable[tuple[int, int]]) -> float:
    """FLOPs needed to generate ``g`` tokens after a prompt of ``p`` tokens, for each ``(p, g)``
    of ``work`` (the formula in the module's notes and docs/BENCHMARKS.md)."""
    total = 0.0
    for p, g in work:
        fed = p + g - 1
        keys = fed * (fed + 1) / 2  # Σ_{t=0}^{fed-1} (t + 1)
        total += 2 * shape.params * fed
        total += 4 * shape.layers * shape.heads * shape.head_dim * keys
        total += 2 * shape.hidden * shape.vocab * g
    return total


def _best_rate(fn: Callable[[], object], flops: float, seconds: float) -> float:
    fn()  # warm-up
    runs, spent, best = 0, 0.0, 0.0
    while spent < seconds or runs < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        spent += dt
        runs += 1
        best = max(best, flops / dt)
    return best


def matmul_peak(seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of ``torch.mm`` over :data:`MATMUL_SHAPES`."""
    best = 0.0
    with torch.inference_mode():
        for m, k, n in MATMUL_SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)

            def run(a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
                return torch.mm(a, b)

            best = max(best, _best_rate(run, 2 * m * k * n, seconds / len(MATMUL_SHAPES)))
    return best


def packed_peak(model: Any, seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of oneDNN's prepacked linear on each distinct linear shape of ``model``
    (and of its fused sibling products) at :data:`PACKED_ROWS` rows (0 when this torch has no
    oneDNN packing)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0.0
    shapes = sorted(
        {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        | {(m.in_features, sum(m.fused.sizes)) for m in model.modules() if getattr(m, "fused", None)}
    )  # the fused products' shapes too (worker.engine.cpu.FusedLinear): the engine runs those
    shapes = [s for s in shapes if s[1] < 16_000] or shapes  # the vocabulary projection aside
    best = 0.0
    budget = seconds / max(1, len(shapes) * len(PACKED_ROWS))
    with torch.inference_mode():
        for k, n in shapes:
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k))
            for m in PACKED_ROWS:
                x = torch.randn(m, k)

                def run(x: torch.Tensor = x, w: torch.Tensor = packed) -> torch.Tensor:
                    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

                best = max(best, _best_rate(run, 2 * m * k * n, budget))
    return best


def kernel_peak(model: Any, seconds: float = 2.0) -> dict[str, float]:
    """``{"matmul": …, "packed": …, "best": …}`` in FLOP/s (see the module's notes)."""
    mm = matmul_peak(seconds / 2)
    packed = packed_peak(model, seconds / 2)
    return {"matmul": mm, "packed": packed, "best": max(mm, packed)}
