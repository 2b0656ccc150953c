"""The benchmarks run end to end (on the tiny model: a smoke run, not a figure), and the parts their
figures rest on compute what they say."""

from __future__ import annotations

import pytest
import torch

from bench import engine, queue, scaling


def test_queue_benchmark_smoke() -> None:
    result = queue.main(["--tiny", "--items", "24", "--new-tokens", "4", "--chunk-size", "8"])
    assert result["chunks"] == 3 and result["queue_seconds"] > 0 and result["engine_seconds"] > 0
    assert result["chunk_overhead_ms_median"] is not None and result["chunk_overhead_ms_median"] >= 0
    assert result["status_tok_s"] > 0


def test_scaling_benchmark_smoke() -> None:
    result = scaling.main(["--tiny", "--items", "16", "--new-tokens", "4", "--chunk-size", "2"])
    assert result["scaling"] > 0
    assert sum(result["items_per_worker"].values()) == 16


def test_engine_benchmark_smoke() -> None:
    result = engine.main(
        ["--tiny", "--items", "12", "--new-tokens", "6", "--naive-items", "3", "--skip-generate-batch"]
    )
    # EOS is ignored, so every prompt generates exactly --new-tokens
    assert result["engine_tokens"] == 12 * 6
    assert result["naive_tok_s"] > 0 and result["engine_tok_s"] > 0
    assert result["speedup"] == pytest.approx(result["engine_tok_s"] / result["naive_tok_s"], rel=0.01)
    assert result["roofline_fraction"] > 0 and result["matmul_peak_gflops"] > 0
    assert result["generate_batch"] == "skipped"


def test_non_embedding_parameters_skip_embeddings_and_tied_head() -> None:
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(100, 8)
    model.layer = torch.nn.Linear(8, 8)
    model.lm_head = torch.nn.Linear(8, 100, bias=False)
    model.lm_head.weight = model.embed_tokens.weight
    assert engine.non_embedding_parameters(model) == 8 * 8 + 8


def test_spread_takes_prompts_across_the_length_range() -> None:
    from types import SimpleNamespace

    items = [SimpleNamespace(prompt="x" * n) for n in range(1, 101)]
    picked = engine.spread(items, 4)
    assert [len(p.prompt) for p in picked] == [13, 38, 63, 88]
    assert engine.spread(items[:3], 5) == items[:3]
