"""CPU set-up a worker applies explicitly: torch's thread count and oneDNN-prepacked linear weights.

Both change process-wide or model-wide state (torch's global thread count; the class of every plain
``nn.Linear``), so the engine never does them itself: :func:`worker.engine.build_engine` calls
:func:`prepare_cpu` for a worker on the CPU.

On the CPU in fp32, plain ``nn.Linear`` layers get a oneDNN-prepacked copy of their weight, used for
products of up to ``packed_max_rows`` rows: 1.2–2× faster than the default BLAS call for decode
steps (8–128 rows) on the machines measured (docs/BENCHMARKS.md).  Whether it also wins for
prefill-sized products differs between CPUs (a Xeon: BLAS from ~512 rows; an EPYC: oneDNN at every
size), so the crossover is measured once when the weights are packed.  Skipped when RAM is short.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.core.logs import get_logger
from worker.core.settings import Settings

PACKED_MAX_ROWS = 256
"""Products with at most this many rows use the prepacked weight when the crossover is not
measured (:func:`packed_crossover`); the crossover measured on a Xeon was 256–512."""
PACKED_PROBE_ROWS = (512, 1024, 2048)
"""Row counts at which :func:`packed_crossover` times the prepacked weight against BLAS."""
CROSSOVER_ROUNDS = 3
"""Interleaved timings of each side per probe in :func:`packed_crossover`."""
CROSSOVER_MARGIN = 0.05
"""BLAS must be this much faster to end the packed range: one disturbed timing on a shared
machine sent every prefill product to BLAS (2026-12-04), where the packed product is ~2× faster
on this project's EPYC (docs/BENCHMARKS.md)."""
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linear layers (attribute names of one module) that read the same input in the model
families the engine serves (Llama, Qwen2, Mistral …): each group shares one product."""


@dataclass(frozen=True)
class CpuSetup:
    threads: int
    packed_layers: int


def prepare_cpu(model: torch.nn.Module, settings: Settings) -> CpuSetup:
    """Set torch's threads and pack ``model``'s linear weights (see the module's notes)."""
    return CpuSetup(
        threads=configure_threads(settings),
        packed_layers=pack_linear_weights(model, fuse=settings.fused_linear),
    )


def physical_cores() -> int:
    """CPU cores this process may use, counting each physical core once."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or available
        logical = psutil.cpu_count(logical=True) or available
    except Exception:
        physical = logical = available
    per_core = max(1, logical // max(physical, 1))  # hardware threads per core
    return max(1, available // per_core)


def configure_threads(settings: Settings) -> int:
    """torch intra-op threads: ``GENQ_THREADS`` when set, else one per physical core."""
    wanted = settings.threads or physical_cores()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def linear_pointwise(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` through oneDNN with ``W`` prepacked by ``_reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Linear):
    """``nn.Linear`` with a oneDNN-prepacked copy of its weight for products of few rows.

    Decode steps multiply a handful of rows by every weight matrix; oneDNN's blocked weight layout
    does that much faster than the default BLAS call, which stays in use (on ``weight``) for large
    products such as prefill, where it is faster.  ``weight`` and the module's state are unchanged.
    """

    packed_weight: torch.Tensor
    """The prepacked weight (absent while the layer's product is part of ``fused``)."""
    packed_max_rows: int = PACKED_MAX_ROWS
    """Products of up to this many rows use ``packed_weight`` (see :func:`packed_crossover`)."""
    fused: FusedLinear | None = None
    """The group whose one product this layer's is part of (:class:`FusedLinear`), if any."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.numel() <= self.packed_max_rows * self.in_features
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            if self.fused is not None:
                return self.fused.product(self, x)
            return linear_pointwise(x.contiguous(), self.packed_weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class FusedLinear:
    """Packed linear layers that read the same input, computed as one product.

    The layers' weights (and biases; a missing bias is zeros) side by side in one prepacked weight.
    A member called with an input computes the product of every member and keeps the others'
    columns until they are asked for with that same input (the same tensor object): a layer's
    query, key and value projections, called one after the other on its hidden states, cost one
    product.  A member called with any other input computes the product afresh, so the result is
    right whatever the call order; bit for bit what separate products give (each output column is
    the same dot product).  The members' own packed weights are dropped: memory stays as it was."""

    def __init__(self, members: Sequence[PackedLinear]) -> None:
        self.members = list(members)
        weight = torch.cat([m.weight.detach() for m in members])
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias: torch.Tensor | None = None
        if any(m.bias is not None for m in members):
            self.bias = torch.cat(
                [
                    m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                    for m in members
                ]
            )
        self.sizes = [m.out_features for m in members]
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}
        """The columns of the last product not taken yet, by member (``id``)."""

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's product of ``x``, side by side (members in order)."""
        return linear_pointwise(x.contiguous(), self.packed_weight, self.bias)

    def product(self, member: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        key = id(member)
        if x is not self._input or key not in self._pending:
            out = self.whole(x)
            self._pending = {id(m): y for m, y in zip(self.members, out.split(self.sizes, -1), strict=True)}
            self._input = x
        taken = self._pending.pop(key)
        if not self._pending:
            self._input = None  # every member served: hold no activations between passes
        return taken


def fuse_linear_groups(model: torch.nn.Module) -> int:
    """Give each group of :data:`FUSED_GROUPS` whose members are packed, of one input size, on the
    products' path, one :class:`FusedLinear`; returns how many groups were fused."""
    fused = 0
    for module in model.modules():
        for names in FUSED_GROUPS:
            members = [getattr(module, n, None) for n in names]
            layers = [m for m in members if isinstance(m, PackedLinear) and m.fused is None]
            if len(layers) != len(names) or len({(m.in_features, m.packed_max_rows) for m in layers}) != 1:
                continue
            group = FusedLinear(layers)
            for m in layers:
                m.fused = group
                del m.packed_weight
            fused += 1
    return fused


def packed_layers(model: torch.nn.Module) -> int:
    """How many of ``model``'s linear layers are packed."""
    return sum(1 for m in model.modules() if isinstance(m, PackedLinear))


def pack_linear_weights(model: torch.nn.Module, *, min_free_fraction: float = 0.5, fuse: bool = True) -> int:
    """Give every plain fp32 ``nn.Linear`` on the CPU a prepacked weight (see :class:`PackedLinear`),
    and (``fuse``) one shared weight to each group of siblings reading the same input
    (:func:`fuse_linear_groups`).

    Idempotent; returns how many layers are packed.  Skipped (0) when oneDNN is missing, when the
    copies would take more than ``min_free_fraction`` of the available RAM, or when the packed
    layer does not reproduce the plain one."""
    already = packed_layers(model)
    if already:
        return already
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    targets = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    if not targets:
        return 0
    need = sum(m.weight.numel() * 4 for m in targets)
    try:
        import psutil

        free = psutil.virtual_memory().available
    except Exception:
        return 0
    log = get_logger()
    if need > min_free_fraction * free:
        log.info("linear_packing_skipped", need_bytes=need, available_bytes=free)
        return 0
    try:
        with torch.inference_mode():
            if not _packing_reproduces(targets[0]):
                return 0
            for module in targets:
                module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
                module.__class__ = PackedLinear
            layers = [m for m in targets if isinstance(m, PackedLinear)]
            crossover = packed_crossover(_typical(layers))
            for layer in layers:
                layer.packed_max_rows = crossover
            groups = fuse_linear_groups(model) if fuse else 0
            log.info("linear_packed", layers=len(targets), packed_max_rows=crossover, fused_groups=groups)
    except RuntimeError as exc:  # an op missing from this torch build
        for module in targets:
            if isinstance(module, PackedLinear):
                module.__dict__.pop("packed_weight", None)
                module.__dict__.pop("fused", None)
                module.__class__ = torch.nn.Linear  # type: ignore[assignment]
        log.warning("linear_packing_failed", error=str(exc)[:200])
        return 0
    return len(targets)


def _packing_reproduces(probe: torch.nn.Linear) -> bool:
    packed = torch.ops.mkldnn._reorder_linear_weight(probe.weight.detach())
    x = torch.randn(3, probe.in_features)
    ref = torch.nn.functional.linear(x, probe.weight, probe.bias)
    got = linear_pointwise(x, packed, probe.bias)
    if torch.allclose(ref, got, rtol=1e-3, atol=1e-4):
        return True
    get_logger().warning("linear_packing_mismatch", max_diff=float((ref - got).abs().max()))
    return False


def packed_crossover(
    layer: PackedLinear,
    probe_rows: Sequence[int] = PACKED_PROBE_ROWS,
    timer: Callable[[Callable[[], torch.Tensor]], float] | None = None,
) -> int:
    """The most rows for which ``layer``'s prepacked weight is still faster than BLAS: timed at
    each of ``probe_rows`` (by ``timer``, the two interleaved :data:`CROSSOVER_ROUNDS` times, the
    best of each kept), stopping at the first size where BLAS is faster by more than
    :data:`CROSSOVER_MARGIN`.  Never below ``PACKED_MAX_ROWS`` (decode-sized products, where
    packing always won); a value past the largest probe (no limit in practice) if the packed
    weight wins at all."""
    clock = timer or best_time

    def blas_wins(packed: Callable[[], torch.Tensor], blas: Callable[[], torch.Tensor]) -> bool:
        p = b = float("inf")
        for _ in range(CROSSOVER_ROUNDS):  # interleaved: a burst of other work hits both alike
            p, b = min(p, clock(packed)), min(b, clock(blas))
        return b < p * (1 - CROSSOVER_MARGIN)

    chosen = PACKED_MAX_ROWS
    with torch.inference_mode():
        for rows in sorted(probe_rows):
            x = torch.randn(rows, layer.in_features)

            def blas(x: torch.Tensor = x) -> torch.Tensor:
                return torch.nn.functional.linear(x, layer.weight, layer.bias)

            def packed(x: torch.Tensor = x) -> torch.Tensor:
                return linear_pointwise(x, layer.packed_weight, layer.bias)

            if blas_wins(packed, blas):
                break
            chosen = max(chosen, rows)
        else:
            chosen = 1 << 30
    return chosen


def _typical(layers: Sequence[PackedLinear]) -> PackedLinear:
    """A layer of the shape that holds most of the weights (an MLP projection, in a transformer)."""
    weight: dict[tuple[int, int], int] = {}
    for m in layers:
        shape = (m.in_features, m.out_features)
        weight[shape] = weight.get(shape, 0) + m.weight.numel()
    shape = max(weight, key=lambda k: weight[k])
    return next(m for m in layers if (m.in_features, m.out_features) == shape)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after one warm-up call."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
