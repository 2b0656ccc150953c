"""The queue and scaling benchmarks run end to end (on the tiny model: a smoke run, not a figure)."""

from __future__ import annotations

from bench import queue, scaling


def test_queue_benchmark_smoke() -> None:
    result = queue.main(["--tiny", "--items", "24", "--new-tokens", "4", "--chunk-size", "8"])
    assert result["chunks"] == 3 and result["queue_seconds"] > 0 and result["engine_seconds"] > 0
    assert result["chunk_overhead_ms_median"] is not None and result["chunk_overhead_ms_median"] >= 0
    assert result["status_tok_s"] > 0


def test_scaling_benchmark_smoke() -> None:
    result = scaling.main(["--tiny", "--items", "16", "--new-tokens", "4", "--chunk-size", "2"])
    assert result["scaling"] > 0
    assert sum(result["items_per_worker"].values()) == 16
