"""Choosing the batch size: the pure search on injected measurements, and the real autotuner."""

from __future__ import annotations

import pytest

from worker.core.schema import GenParams, Item
from worker.core.settings import Settings
from worker.engine import Engine


def items(n: int = 7) -> list[Item]:
    return [
        Item(index=i, id=f"i{i}", prompt="fever " * (i + 1), params=GenParams(max_new_tokens=3))
        for i in range(n)
    ]


def test_batch_size_search_stops_when_bigger_stops_paying() -> None:
    from worker.engine import pick_batch_size, search_batch_sizes

    rates = {4: 100.0, 8: 180.0, 16: 300.0, 32: 305.0, 64: 290.0, 128: 400.0}
    asked: list[int] = []

    def measure(size: int) -> float:
        asked.append(size)
        return rates[size]

    table = search_batch_sizes(list(rates), measure)
    assert asked == [4, 8, 16, 32, 64]  # 32 and 64 did not beat 300 by 2%: 128 is never tried
    assert pick_batch_size(table) == 16  # smallest within 95% of the best (305)
    assert pick_batch_size({}) > 0


def test_batch_size_search_stops_at_out_of_memory() -> None:
    from worker.core.errors import OutOfMemory
    from worker.engine import search_batch_sizes

    def measure(size: int) -> float:
        if size >= 16:
            raise OutOfMemory("injected")
        return float(size)

    assert search_batch_sizes([4, 8, 16, 32], measure) == {4: 4.0, 8: 8.0}
    with pytest.raises(ValueError):
        search_batch_sizes([4], lambda size: (_ for _ in ()).throw(ValueError("not memory")))


def test_autotune_measures_once_and_caches(loaded_fp32, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path)
    first = Engine(loaded_fp32, settings=settings)
    chosen = first.autotune(candidates=(1, 2, 4), context=16, steps=2)
    assert chosen in (1, 2, 4) and first.max_batch_size == chosen
    assert first.autotuned is not None and first.autotuned["cached"] is False
    assert set(first.autotuned["tokens_per_second"]) <= {"1", "2", "4"}
    assert (tmp_path / "autotune.json").exists()
    again = Engine(loaded_fp32, settings=settings)
    assert again.autotune(candidates=(1, 2, 4), context=16, steps=2) == chosen
    assert again.autotuned is not None and again.autotuned["cached"] is True
    # the tuned size is what generate uses
    assert again.batch_limit() == chosen and all(r.ok for r in again.generate(items()))
