"""CPU set-up: packed linear weights and threads, applied by build_engine and never by Engine()."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_greedy
from worker.core.settings import Settings
from worker.engine import PACKED_MAX_ROWS, Engine, build_engine


def test_packed_linear_reproduces_nn_linear() -> None:
    import torch

    from worker.engine import PackedLinear, pack_linear_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = model(x)
        packed = pack_linear_weights(model)
        if not packed:
            pytest.skip("this torch build has no oneDNN linear packing")
        assert packed == 2 and all(isinstance(m, PackedLinear) for m in (model[0], model[2]))
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)  # few rows: packed path
        # the crossover was measured, and is at least the fallback; past it, the BLAS path
        assert all(m.packed_max_rows >= PACKED_MAX_ROWS for m in (model[0], model[2]))
        big = torch.randn(600, 64)
        plain = torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(big, model[0].weight, model[0].bias)), model[2].weight
        )
        for limit in (1 << 30, 599):  # 600 rows through the packed weight, then through BLAS
            model[0].packed_max_rows = model[2].packed_max_rows = limit
            torch.testing.assert_close(model(big), plain, atol=1e-4, rtol=1e-4)
        assert pack_linear_weights(model) == 2  # idempotent


def test_packed_crossover_is_measured_per_size() -> None:
    """The crossover is the largest probed size at which the packed weight won (never below the
    decode-sized fallback), or no limit when it won at every probe.  A scripted clock decides who
    wins; the products it times are real."""
    import torch

    from worker.engine import PackedLinear, pack_linear_weights, packed_crossover

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with torch.inference_mode():
        if not pack_linear_weights(model):
            pytest.skip("this torch build has no oneDNN linear packing")
    layer = model[0]
    assert isinstance(layer, PackedLinear)

    def clock(packed_wins_up_to: int):  # type: ignore[no-untyped-def]
        def timer(fn) -> float:  # type: ignore[no-untyped-def]
            rows = fn().shape[0]  # runs the product; its row count says which probe this is
            is_packed = "packed" in fn.__name__
            return 1.0 if is_packed == (rows <= packed_wins_up_to) else 2.0

        return timer

    probes = (512, 1024, 2048)
    assert packed_crossover(layer, probes, timer=clock(1024)) == 1024
    # BLAS ahead by less than the margin, or in one disturbed timing only: the packed range goes on
    script = {  # (rows, packed?): the timings in the order they are taken
        (512, True): [1.00] * 3,
        (512, False): [0.98] * 3,
        (1024, True): [3.0, 1.0, 1.0],
        (1024, False): [2.0] * 3,
        (2048, True): [1.0] * 3,
        (2048, False): [2.0] * 3,
    }

    def scripted(fn) -> float:  # type: ignore[no-untyped-def]
        return script[(fn().shape[0], "packed" in fn.__name__)].pop(0)

    assert packed_crossover(layer, probes, timer=scripted) > 2048
    assert packed_crossover(layer, probes, timer=clock(0)) == PACKED_MAX_ROWS
    assert packed_crossover(layer, probes, timer=clock(10**9)) > 2048
    assert packed_crossover(layer, probes) >= PACKED_MAX_ROWS  # the real clock


def test_engine_constructor_changes_nothing_outside_the_engine(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    """Engine() leaves torch's thread count and the model's linear classes alone; build_engine
    (what a worker runs) sets the threads and packs the weights."""
    from worker.engine.cpu import packed_layers
    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "fp32")  # a model of its own: packing is not undone
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Engine(loaded)
        assert torch.get_num_threads() == 1 and packed_layers(loaded.model) == 0
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN")
        build_engine(loaded, settings=Settings(threads=2), autotune=False)
        assert torch.get_num_threads() == 2 and packed_layers(loaded.model) > 0
    finally:
        torch.set_num_threads(before)


class _Siblings(torch.nn.Module):
    """An attention's query/key/value projections (with biases) and an MLP's gate/up (without):
    the sibling groups :func:`worker.engine.cpu.fuse_linear_groups` looks for."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, n) for n in (64, 16, 16))
        self.gate_proj = torch.nn.Linear(64, 96, bias=False)
        self.up_proj = torch.nn.Linear(64, 96, bias=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x), self.up_proj(x)]


def test_fused_linear_is_bit_for_bit_the_separate_products() -> None:
    """Siblings reading one input share one packed weight: each gets exactly the numbers its own
    packed product gives, in any call order and with other inputs in between; their own packed
    weights are dropped (memory as before); ``fuse=False`` leaves every layer its own."""
    from worker.engine.cpu import FusedLinear, PackedLinear, pack_linear_weights, prepare_cpu

    torch.manual_seed(0)
    fused, separate = _Siblings(), _Siblings()
    separate.load_state_dict(fused.state_dict())
    with torch.inference_mode():
        # what a worker with GENQ_FUSED_LINEAR=0 does
        off = Settings(threads=torch.get_num_threads(), fused_linear=False)
        if not prepare_cpu(separate, off).packed_layers:
            pytest.skip("this torch build has no oneDNN linear packing")
        assert pack_linear_weights(fused) == 5
        layers = [m for m in fused.modules() if isinstance(m, PackedLinear)]
        assert all(isinstance(m.fused, FusedLinear) and "packed_weight" not in m.__dict__ for m in layers)
        assert len({id(m.fused) for m in layers}) == 2  # q/k/v and gate/up
        assert all(
            m.fused is None and "packed_weight" in m.__dict__ for m in separate.modules() if m is not separate
        )
        x, y = torch.randn(7, 64), torch.randn(7, 64)
        for got, want in zip(fused(x), separate(x), strict=True):
            assert torch.equal(got, want)
        # out of order, a member asked twice, another input in between
        order = [fused.v_proj(x), fused.q_proj(y), fused.v_proj(x), fused.k_proj(y), fused.q_proj(y)]
        want = [
            separate.v_proj(x),
            separate.q_proj(y),
            separate.v_proj(x),
            separate.k_proj(y),
            separate.q_proj(y),
        ]
        for got, w in zip(order, want, strict=True):
            assert torch.equal(got, w)


def test_fused_linear_changes_no_token(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    """The tiny model with packed, fused siblings (what a worker runs) gives HF ``generate``'s
    greedy tokens, with live-span attention on and off; and the fused products really ran."""
    from worker.core.schema import GenParams, Item
    from worker.engine.cpu import FusedLinear
    from worker.model.loading import load_model

    loaded = load_model(tiny_profile, "fp32")  # a model of its own: packing is not undone
    prompts = ["the patient has a fever", "dose of aspirin", "a", "blood pressure was 140 / 90 mmHg ."]
    tok, model = loaded.tokenizer, loaded.model
    want = hf_greedy(model, tok, prompts, 8)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    before = torch.get_num_threads()
    products = 0
    real = FusedLinear.whole

    def counted(self, x):  # type: ignore[no-untyped-def]
        nonlocal products
        products += 1
        return real(self, x)

    FusedLinear.whole = counted  # type: ignore[method-assign]
    try:
        engine = build_engine(
            loaded, settings=Settings(threads=2, fused_linear=True), autotune=False, max_batch_size=4
        )
        items = [
            Item(index=i, id=str(i), prompt=p, params=GenParams(max_new_tokens=8))
            for i, p in enumerate(prompts)
        ]
        engine.rules.ignore_eos = True
        for live in (True, False):
            engine.forward.live_span = live
            assert [r.text for r in engine.generate(items)] == want
    finally:
        FusedLinear.whole = real  # type: ignore[method-assign]
        torch.set_num_threads(before)
    assert products > 0
