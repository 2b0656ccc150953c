"""Mode rules over injected facts, and the memory estimate."""

from __future__ import annotations

import pytest

from worker.core.errors import InsufficientMemory, ModeError
from worker.model.capability import Estimate, Facts, GpuFacts, choose_mode, estimate

GiB = 1024**3
# Qwen2.5-7B-shaped: 6.53B params in decoder linears, 1.09B in embeddings + lm_head + norms
SEVEN_B = Estimate(total_params=7_615_616_512, quantizable_params=6_525_288_448, other_params=1_090_328_064)


def gpu(total_gib: float, free_gib: float | None = None, bf16: bool = True) -> GpuFacts:
    free = total_gib if free_gib is None else free_gib
    return GpuFacts(
        index=0, name="test-gpu", total_bytes=int(total_gib * GiB), free_bytes=int(free * GiB), bf16=bf16
    )


CASES = [
    # (name, facts, requested, expected mode, device, placement)
    (
        "big gpu",
        Facts(gpus=(gpu(80),), bnb_cuda=True, bnb_cpu=True, ram_available_bytes=64 * GiB),
        "auto",
        "nf4",
        "cuda",
        "gpu",
    ),
    (
        "small gpu offloads",
        Facts(gpus=(gpu(4),), bnb_cuda=True, ram_available_bytes=64 * GiB),
        "auto",
        "nf4",
        "cuda",
        "gpu+cpu",
    ),
    (
        "gpu without bnb falls back to fp32",
        Facts(gpus=(gpu(80),), bnb_cuda=False, ram_available_bytes=64 * GiB),
        "auto",
        "fp32",
        "cpu",
        "cpu",
    ),
    ("cpu with enough ram", Facts(bnb_cpu=True, ram_available_bytes=64 * GiB), "auto", "fp32", "cpu", "cpu"),
    (
        "cpu without enough ram uses nf4 on cpu",
        Facts(bnb_cpu=True, ram_available_bytes=16 * GiB),
        "auto",
        "nf4",
        "cpu",
        "cpu",
    ),
    (
        "explicit fp32 on a gpu machine",
        Facts(gpus=(gpu(80),), bnb_cuda=True, ram_available_bytes=64 * GiB),
        "fp32",
        "fp32",
        "cpu",
        "cpu",
    ),
    ("explicit nf4 on a cpu", Facts(bnb_cpu=True, ram_available_bytes=64 * GiB), "nf4", "nf4", "cpu", "cpu"),
]


@pytest.mark.parametrize(
    ("name", "facts", "requested", "mode", "device", "placement"), CASES, ids=[c[0] for c in CASES]
)
def test_rules(name: str, facts: Facts, requested: str, mode: str, device: str, placement: str) -> None:
    decision = choose_mode(facts, SEVEN_B, requested)  # type: ignore[arg-type]
    assert (decision.mode, decision.device, decision.placement) == (mode, device, placement)


def test_nothing_fits_names_the_numbers() -> None:
    facts = Facts(bnb_cpu=True, ram_available_bytes=2 * GiB)
    with pytest.raises(InsufficientMemory) as err:
        choose_mode(facts, SEVEN_B, "auto")
    text = str(err.value)
    assert "28.37 GiB in fp32" in text and "nf4" in text and "1.70 GiB of RAM" in text
    assert "smaller profile" in text


def test_explicit_fp32_that_does_not_fit_is_refused_not_changed() -> None:
    facts = Facts(gpus=(gpu(80),), bnb_cuda=True, ram_available_bytes=8 * GiB)
    with pytest.raises(InsufficientMemory, match="--mode fp32 refused"):
        choose_mode(facts, SEVEN_B, "fp32")


def test_explicit_nf4_without_bitsandbytes_is_refused() -> None:
    with pytest.raises(ModeError, match="bitsandbytes"):
        choose_mode(Facts(ram_available_bytes=64 * GiB), SEVEN_B, "nf4")


def test_unknown_mode() -> None:
    with pytest.raises(ModeError, match="unknown mode"):
        choose_mode(Facts(ram_available_bytes=64 * GiB), SEVEN_B, "int8")  # type: ignore[arg-type]


def test_nf4_estimate_of_a_7b_model_is_about_5_5_gb() -> None:
    # Packed 4-bit linears + 8-bit absmax + fp16 embeddings/lm_head: the ~5.5 GB users see.
    assert 5.3e9 < SEVEN_B.nf4_bytes < 5.7e9
    assert SEVEN_B.fp32_bytes == 4 * SEVEN_B.total_params


def test_estimate_from_headers_matches_config(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    from worker.model.capability import _count, _shapes_from_config
    from worker.model.loading import resolve_sources

    src = resolve_sources(tiny_profile)
    est = estimate(src.base, src.adapter)
    assert est.source == "safetensors"
    import json

    quant, other = _count(_shapes_from_config(json.loads((src.base / "config.json").read_text())))
    assert (quant, other) == (est.quantizable_params, est.other_params)
    assert est.adapter_params > 0
