"""``n`` > 1: several samples of one item, each decoded as an item of its own, merged back.

An item asking for ``n`` samples becomes ``n`` rows that share nothing but the prompt: sample
``k`` has the seed :func:`worker.core.structured.sample_seed` derives from the item's seed, so
the samples differ from each other and are the same on every run (an item without a seed gets
a random one, shared by its samples).  They may land in different micro-batches or rows; the
item's result is emitted once all ``n`` have finished, with every sample in ``choices``.  An
error in any sample is the item's error.  A chunk handed back mid-item loses only unfinished
work: nothing of an item is written until all its samples are done.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from worker.core.schema import GenParams, Item, ItemResult, Usage
from worker.core.states import FinishReason
from worker.core.structured import MAX_N, Choice, sample_seed

ResultCallback = Callable[[list[ItemResult]], None]
Generate = Callable[..., list[ItemResult]]


def resolved(item: Item, job_params: GenParams | None, defaults: GenParams) -> GenParams:
    return item.params.over(job_params or GenParams()).over(defaults)


def needs_samples(items: Sequence[Item], job_params: GenParams | None, defaults: GenParams) -> bool:
    return any((resolved(it, job_params, defaults).n or 1) > 1 for it in items)


class Samples:
    """The expansion of a list of items and the merging of their samples' results."""

    def __init__(self, items: Sequence[Item], job_params: GenParams | None, defaults: GenParams) -> None:
        self.items = list(items)
        self.expanded: list[Item] = []
        self.origin: dict[int, tuple[Item, int, int]] = {}
        """Sample item index → (the item, sample number, n)."""
        self.parts: dict[int, dict[int, ItemResult]] = {}
        self.merged: dict[int, ItemResult] = {}
        for item in self.items:
            params = resolved(item, job_params, defaults)
            n = params.n or 1
            if n == 1:
                self.expanded.append(item)
                continue
            base = params.seed if params.seed is not None else random.getrandbits(63)
            for k in range(n):
                index = -(1 + item.index * MAX_N + k)  # never an input's index
                sample_params = item.params.model_copy(update={"n": 1, "seed": sample_seed(base, k)})
                self.expanded.append(item.model_copy(update={"index": index, "params": sample_params}))
                self.origin[index] = (item, k, n)

    def merge(self, results: list[ItemResult]) -> list[ItemResult]:
        """Results of items now complete (plain items pass through)."""
        done: list[ItemResult] = []
        for r in results:
            found = self.origin.get(r.index)
            if found is None:
                done.append(r)
                continue
            item, k, n = found
            if item.index in self.merged:
                continue
            if not r.ok:  # one failed sample fails the item
                self.merged[item.index] = r.model_copy(update={"index": item.index})
                done.append(self.merged[item.index])
                continue
            parts = self.parts.setdefault(item.index, {})
            parts[k] = r
            if len(parts) == n:
                self.merged[item.index] = _combine(item, [parts[i] for i in range(n)])
                done.append(self.merged[item.index])
        return done


def _combine(item: Item, samples: list[ItemResult]) -> ItemResult:
    first = samples[0]
    choices = [
        Choice(
            index=k,
            text=r.text or "",
            finish_reason=r.finish_reason or FinishReason.LENGTH,
            logprobs=r.logprobs,
            json_valid=r.json_valid,
            completion_tokens=r.usage.completion_tokens,
        )
        for k, r in enumerate(samples)
    ]
    usage = Usage(
        prompt_tokens=first.usage.prompt_tokens,
        completion_tokens=sum(r.usage.completion_tokens for r in samples),
    )
    latency = max((r.latency_ms or 0.0) for r in samples)
    return first.model_copy(
        update={"index": item.index, "usage": usage, "latency_ms": latency, "choices": choices}
    )


def generate_samples(
    generate: Generate,
    items: Sequence[Item],
    defaults: GenParams,
    *,
    job_params: GenParams | None = None,
    on_results: ResultCallback | None = None,
    **kwargs: Any,
) -> list[ItemResult]:
    """``generate`` (the engine's) over the samples of ``items``; the items' results in order."""
    samples = Samples(items, job_params, defaults)

    def merged(results: list[ItemResult]) -> None:
        done = samples.merge(results)
        if done and on_results is not None:
            on_results(done)

    results = generate(samples.expanded, job_params=job_params, on_results=merged, **kwargs)
    by_index = {r.index: r for r in results if r.index >= 0} | samples.merged
    return [by_index[it.index] for it in samples.items]
