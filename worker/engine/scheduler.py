"""The engine: items in, results out — micro-batches, rows per batch, out-of-memory back-off.

The decoding itself is elsewhere (:mod:`worker.engine.slots`, :mod:`worker.engine.padded`); this
module decides what runs together, streams results as rows finish, and retries what an
out-of-memory error interrupted with fewer rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from worker.core.errors import GenqError, InputError, OutOfMemory, ShutdownRequested
from worker.core.logs import get_logger
from worker.core.observe import observer
from worker.core.schema import GenParams, Item, ItemResult
from worker.core.settings import Settings, get_settings
from worker.engine.adapters import AdapterRouter
from worker.engine.autotune import AUTOTUNE_CANDIDATES, AUTOTUNE_CONTEXT, DEFAULT_BATCH_SIZE, Autotuner
from worker.engine.cpu import packed_layers
from worker.engine.forward import Forward
from worker.engine.llama import llama_pass
from worker.engine.memory import BatchCeiling, is_oom, release_cached
from worker.engine.padded import decode_padded
from worker.engine.prefix import PrefixCache, mark_shared_prefixes
from worker.engine.prompts import Prepared, Prompts
from worker.engine.requests import attach_requests
from worker.engine.rows import Results, Row, RowRules
from worker.engine.samples import generate_samples, needs_samples
from worker.engine.slots import SlotDecoder, admission_order
from worker.model.loading import Loaded

ResultCallback = Callable[[list[ItemResult]], None]

REFILL_FACTOR = 4
"""A micro-batch holds up to this many × ``batch_limit()`` items, so freed rows can be refilled."""


class Engine:
    """Generates for one loaded model.  Not thread-safe: one engine per worker process.

    The constructor changes nothing outside the engine: thread count and packed weights are the
    worker's business (:func:`worker.engine.build_engine`)."""

    def __init__(
        self,
        loaded: Loaded,
        *,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        settings: Settings | None = None,
        worker: str | None = None,
        ignore_eos: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model: torch.nn.Module = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings or get_settings()
        self.worker = worker
        cfg = loaded.profile.engine
        self.max_batch_tokens = max_batch_tokens or cfg.max_batch_tokens
        configured = cfg.max_batch_size
        self.max_batch_size = max_batch_size or (
            configured if isinstance(configured, int) else DEFAULT_BATCH_SIZE
        )
        self.memory = BatchCeiling()
        """The most rows known to fit, learnt from out-of-memory errors and probed upward."""
        self.forward = Forward(self.model, pad_id=int(self.tokenizer.pad_token_id))
        if len(loaded.adapters) > 1 and loaded.adapter == "unmerged":
            self.forward.router = AdapterRouter(self.model, list(loaded.adapters))
        self.group_adapters = cfg.adapter_batching == "grouped"
        """Micro-batches of one adapter each, so every pass runs peft's plain unmerged forward
        (1.6–1.7× the tokens/s of mixing them on the tiny model: docs/OPERATIONS.md, "Several
        adapters on one base"); off: rows of any adapters decode together, each through its own."""
        self.forward.live_span = self.settings.live_span_attention
        if self.settings.own_pass and self.forward.attention == "sdpa" and self.forward.router is None:
            self.forward.own = llama_pass(self.model)
        self.device = self.forward.device
        self.prompts = Prompts(
            self.tokenizer,
            context_length=loaded.context_length,
            profile=loaded.profile.name,
            defaults=loaded.profile.default_params,
        )
        self.rules = RowRules(self.tokenizer, loaded.eos_token_ids, ignore_eos=ignore_eos)
        self.results = Results(self.rules, profile=loaded.profile.name, mode=loaded.mode, worker=worker)
        attach_requests(self)  # response_format, logprobs, penalties; the model's name on results
        self.prefixes = PrefixCache()
        """Shared prefixes' keys and values, kept for the life of the worker (bounded)."""
        self.reuse_prefixes = True
        """Compute a prefix items share once (:mod:`worker.engine.prefix`); off: prefill it per row."""
        self.slots = SlotDecoder(self.forward, self.rules, self.prefixes)
        self.autotuned: dict[str, Any] | None = None
        self.log = get_logger(profile=loaded.profile.name, mode=loaded.mode)
        self.log.info(
            "engine_ready",
            threads=torch.get_num_threads(),
            packed_linear_layers=packed_layers(self.model),
            decode=f"slots/{self.attention}" if self.attention else "simple",
            max_batch_size=self.max_batch_size,
        )

    @property
    def attention(self) -> str | None:
        """``sdpa``/``eager`` when the slot cache applies; None: the plain left-padded loop."""
        return self.forward.attention

    @attention.setter
    def attention(self, value: str | None) -> None:
        self.forward.attention = value

    def prepare(
        self, item: Item, job_params: GenParams | None = None, system_prompt: str | None = None
    ) -> Prepared:
        prep = self.prompts.prepare(item, job_params, system_prompt)
        prep.adapter = self.adapter_of(item)
        if self.rules.shaper is not None:  # an unenforceable response_format: this item's error
            self.rules.shaper.check(prep.params)
        return prep

    def adapter_of(self, item: Item) -> str | None:
        """The loaded adapter ``item`` runs with: the one it names, else the profile's default.
        An adapter the profile does not list is this item's error (submit refuses it first)."""
        adapters = self.loaded.adapters
        if item.adapter is None:
            return self.loaded.default_adapter
        if item.adapter not in adapters:
            known = ", ".join(adapters) or "none"
            raise InputError(
                f"unknown adapter {item.adapter!r}: profile {self.loaded.profile.name} lists {known}",
                field="adapter",
            )
        return item.adapter

    # --- scheduling --------------------------------------------------------------------------

    @property
    def oom_ceiling(self) -> int | None:
        """The largest number of rows known to fit after an out-of-memory error (None: no limit)."""
        return self.memory.ceiling

    def batch_limit(self) -> int:
        """The most rows decoded together: ``max_batch_size``, or less after out-of-memory."""
        return self.memory.limit(self.max_batch_size)

    def micro_batches(self, prepared: Sequence[Prepared]) -> Iterator[list[Prepared]]:
        """Micro-batches of up to ``REFILL_FACTOR × batch_limit()`` items, sorted by shared prefix
        then length, whose rows (``batch_limit()`` at a time) stay within the token cap."""
        ordered = sorted(prepared, key=admission_order)
        if self.group_adapters:
            ordered.sort(key=lambda p: p.adapter or "")
        limit = self.batch_limit()
        batch: list[Prepared] = []
        longest = new = 0
        for prep in ordered:
            l2, n2 = max(longest, len(prep.ids)), max(new, prep.max_new)
            rows = min(len(batch) + 1, limit)
            other = self.group_adapters and batch and batch[-1].adapter != prep.adapter
            if batch and (
                other or len(batch) >= REFILL_FACTOR * limit or (l2 + n2) * rows > self.max_batch_tokens
            ):
                yield batch
                batch, l2, n2 = [], len(prep.ids), prep.max_new
            batch.append(prep)
            longest, new = l2, n2
        if batch:
            yield batch

    def rows_for(self, batch: Sequence[Prepared]) -> int:
        """How many rows of ``batch`` run together: the batch limit, within the token cap."""
        need = max(len(p.ids) + p.max_new for p in batch)
        return max(1, min(len(batch), self.batch_limit(), self.max_batch_tokens // need))

    # --- the public entry point --------------------------------------------------------------

    def generate(
        self,
        items: Sequence[Item],
        *,
        job_params: GenParams | None = None,
        system_prompt: str | None = None,
        on_results: ResultCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        attempts: int = 1,
    ) -> list[ItemResult]:
        """Results for ``items`` (in the order given).  ``on_results`` is called with results as
        soon as they exist (each call holds at most ``batch_limit()`` results); ``should_stop`` is
        checked between micro-batches and before rows are refilled, and raises
        :class:`ShutdownRequested` once the rows in flight finish (what is done stays done)."""
        if needs_samples(items, job_params, self.prompts.defaults):  # n > 1: one item per sample
            return generate_samples(
                self.generate,
                items,
                self.prompts.defaults,
                job_params=job_params,
                system_prompt=system_prompt,
                on_results=on_results,
                should_stop=should_stop,
                attempts=attempts,
            )
        out: dict[int, ItemResult] = {}

        def emit(results: list[ItemResult]) -> None:
            results = [r for r in results if r.index not in out]
            for r in results:
                out[r.index] = r
            if on_results and results:
                on_results(results)

        prepared: list[Prepared] = []
        early: list[ItemResult] = []
        for item in items:
            try:
                prepared.append(self.prepare(item, job_params, system_prompt))
            except GenqError as exc:
                early.append(self.results.error(item, exc, attempts))
        emit(early)
        if self.reuse_prefixes and self.attention:
            mark_shared_prefixes(prepared)
        pending = list(self.micro_batches(prepared))
        while pending:
            batch = [p for p in pending.pop(0) if p.item.index not in out]
            if not batch:
                continue
            if should_stop and should_stop():
                waiting = len(batch) + sum(map(len, pending))
                raise ShutdownRequested(f"stopping with {waiting} items not started")
            rows = self.rows_for(batch)
            t0 = time.perf_counter()
            try:
                self.run_batch(batch, rows, attempts, emit, should_stop)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                observer().oom_backoff(rows)
                left = [p for p in batch if p.item.index not in out]
                pending[:0] = self._back_off(exc, left, rows, attempts, emit)
                continue
            observer().micro_batch(rows, len(batch), time.perf_counter() - t0)
            probe = self.memory.succeeded(rows, self.max_batch_size)
            if probe is not None:
                self.log.info("oom_probe", rows=rows, new_limit=probe or None, wait=self.memory.wait)
        return [out[i.index] for i in items]

    def _back_off(
        self, exc: BaseException, left: list[Prepared], rows: int, attempts: int, emit: ResultCallback
    ) -> list[list[Prepared]]:
        """After an out-of-memory error with ``rows`` rows: what to run again.  Fewer rows at a
        time (the ceiling halves: :class:`BatchCeiling`), or, with one row at a time already, the
        items split in two to find the one that cannot run; an item that fails alone is recorded
        as ``out_of_memory``."""
        release_cached(self.device)
        if not left:
            return []
        if self.memory.failed(rows):  # fewer rows at a time
            again = [left]
        elif len(left) == 1:  # it failed alone
            err = OutOfMemory(f"out of memory with one item: {exc}")
            emit([self.results.error(left[0].item, err, attempts)])
            return []
        else:  # one row at a time still fails: split to find the item
            mid = (len(left) + 1) // 2
            again = [left[:mid], left[mid:]]
        self.log.warning(
            "oom_backoff", rows=rows, new_limit=self.oom_ceiling, left=len(left), error=str(exc)[:200]
        )
        return again

    # --- one micro-batch ---------------------------------------------------------------------

    def run_batch(
        self,
        batch: list[Prepared],
        rows: int,
        attempts: int,
        emit: ResultCallback,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Decode one micro-batch with ``rows`` rows at a time; each row's result goes to ``emit``
        as soon as it is done."""

        def finished(done: list[Row]) -> None:
            if done:
                emit([self.results.ok(row, attempts) for row in done])

        with torch.inference_mode():
            if self.attention:
                self.slots.run(batch, rows, finished, should_stop)
                return
            for s in range(0, len(batch), rows):
                if s and should_stop is not None and should_stop():
                    raise ShutdownRequested(f"stopping with {len(batch) - s} items not started")
                group = [Row.start(p) for p in batch[s : s + rows]]
                decode_padded(self.forward, self.rules, group)
                finished(group)

    # --- measuring the batch size -------------------------------------------------------------

    def autotune(
        self,
        candidates: Sequence[int] = AUTOTUNE_CANDIDATES,
        *,
        context: int = AUTOTUNE_CONTEXT,
        steps: int = 3,
        use_cache: bool = True,
    ) -> int:
        """Set ``max_batch_size`` to the measured best (see :meth:`Autotuner.tune`); the choice is
        cached under ``GENQ_HOME/autotune.json``."""
        tuner = Autotuner(
            self.forward,
            identity={"mode": self.loaded.mode, "adapter": self.loaded.adapter},
            context_length=self.loaded.context_length,
            max_batch_tokens=self.max_batch_tokens,
        )
        cache_file = self.settings.home / "autotune.json" if use_cache else None
        tuned = tuner.tune(candidates, context=context, steps=steps, cache_file=cache_file)
        release_cached(self.device)
        self.max_batch_size = tuned.batch_size
        self.autotuned = tuned.as_dict()
        if tuned.cached:
            self.log.info("autotune_cached", batch_size=tuned.batch_size)
        else:
            self.log.info("autotuned", **self.autotuned)
        return tuned.batch_size
