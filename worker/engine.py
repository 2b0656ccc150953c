"""Turn a list of items into results: batching, per-item sampling, stops, OOM back-off.

``Engine(loaded).generate(items)`` runs its own decode loop over the model's forward pass rather
than ``model.generate``: it needs per-row parameters (temperature, top-p, top-k, seed, stop strings
and length differ between the rows of one batch), per-row results as soon as each row ends, and
rows that leave the batch as soon as they finish, their place taken by the next item.

* Items are tokenised once, sorted by prompt length and cut into micro-batches (up to
  ``4 × batch_limit()`` items).  A micro-batch runs with ``batch_limit()`` rows at a time
  (fewer if ``max_batch_tokens`` — rows × (prompt + new tokens) — says so): continuous batching.
  When rows finish, the next items of the micro-batch are prefilled and take their places.
* Prefill runs in length-sorted groups of about ``PREFILL_TOKENS`` padded tokens, left-padded, with
  the logits of the last position only.  Each row's keys and values are then copied, unpadded, into
  a preallocated per-row cache (:class:`SlotCache`); a decode step writes every row's new key and
  value at that row's own position and attends over a mask built here, so no step re-creates the
  cache (no ``torch.cat``) or depends on a neighbour's length.  Models whose attention this cannot
  express (sliding windows, attention kernels other than sdpa/eager) use the plain
  left-padded loop instead (:meth:`Engine._decode_simple`).
* On the CPU in fp32, plain ``nn.Linear`` layers get a oneDNN-prepacked copy of their weight,
  used for products of up to ``packed_max_rows`` rows: 1.2–2× faster than the default BLAS call
  for decode steps (8–128 rows) on the machines measured (docs/BENCHMARKS.md).  Whether it also
  wins for prefill-sized products differs between CPUs (a Xeon: BLAS from ~512 rows; an EPYC:
  oneDNN at every size), so the crossover is measured once when the weights are packed.
  Skipped when RAM is short.
* ``max_batch_size: auto`` is measured once per model, mode and machine by :meth:`Engine.autotune`
  (a few decode steps per candidate size, cached under ``GENQ_HOME``).
* Greedy rows take the argmax.  Sampled rows draw from their own ``torch.Generator`` seeded by the
  item's ``seed``: an item gives the same text alone or in any batch.
* Out of memory halves the number of rows run together and retries what is not finished; an item
  that cannot run alone records ``out_of_memory``.  Too-long prompts record
  ``context_length_exceeded``.  One item's error never spoils its neighbours.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from worker.core.errors import (
    ContextLengthExceeded,
    GenerationError,
    GenqError,
    OutOfMemory,
    ShutdownRequested,
)
from worker.core.logs import get_logger
from worker.core.schema import ErrorInfo, GenParams, Item, ItemResult, Usage, error_result
from worker.core.settings import Settings, get_settings
from worker.core.states import FinishReason, ItemStatus
from worker.model.loading import Loaded

ResultCallback = Callable[[list[ItemResult]], None]

PREFILL_TOKENS = 512
"""Padded prompt tokens per prefill forward pass.  Enough rows for full-speed matrix products, few
enough that the activations (tokens × intermediate size) stay in cache: on the 2-core EPYC of
docs/BENCHMARKS.md the benchmark's 4,215 prompt tokens prefill in 8.9 s at 256–512 tokens per
pass, 9.1 s at 1,024 and 10.4 s at 2,048.  It also bounds activation memory."""

REFILL_FACTOR = 4
"""A micro-batch holds up to this many × ``batch_limit()`` items, so freed rows can be refilled."""

PACKED_MAX_ROWS = 256
"""Products with at most this many rows use the prepacked weight when the crossover is not
measured (:func:`packed_crossover`); the crossover measured on a Xeon was 256–512."""
PACKED_PROBE_ROWS = (512, 1024, 2048)
"""Row counts at which :func:`packed_crossover` times the prepacked weight against BLAS."""

AUTOTUNE_CANDIDATES = (4, 8, 16, 32, 64, 128, 256)
AUTOTUNE_CONTEXT = 256
"""Tokens already in each row's cache while the autotuner times its decode steps."""
AUTOTUNE_TOLERANCE = 0.95
"""The autotuner picks the smallest batch size within this fraction of the best throughput."""
DEFAULT_BATCH_SIZE = 32
"""``max_batch_size: auto`` before (or without) :meth:`Engine.autotune`."""


@dataclass
class Prepared:
    """An item, tokenised, with its parameters resolved."""

    item: Item
    ids: list[int]
    params: GenParams
    max_new: int
    clipped: bool
    """``max_new`` was cut to fit the context: running out of it is ``length``."""


@dataclass
class _Row:
    prep: Prepared
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.perf_counter)
    done_at: float = 0.0


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | OutOfMemory):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class SlotCache(Cache):
    """A KV cache of ``rows`` preallocated slots, one per batch row, for decode steps.

    Slot ``i`` holds the keys and values of row ``i`` from position 0 to ``lengths[i] - 1``, with no
    padding in front.  Before each decode step :meth:`step` says which rows take part (the first
    ``n``) and where each row's new token goes; the model's attention layers call :meth:`update`,
    which writes the new keys and values in place and returns views of the first ``n`` slots up to
    the longest row.  The mask that hides each row's unused tail is built by the engine.
    """

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.capacity = capacity
        self.key_slots: list[torch.Tensor] = []
        self.value_slots: list[torch.Tensor] = []
        self.lengths = [0] * rows
        self._n = 0
        self._span = 0
        self._index: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return bool(self.key_slots)

    def allocate(self, like: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Allocate every layer's slots with the heads, head size, dtype and device of ``like``."""
        self.key_slots, self.value_slots = [], []
        for k, v in like:
            self.key_slots.append(k.new_zeros((self.rows, k.shape[1], self.capacity, k.shape[3])))
            self.value_slots.append(v.new_zeros((self.rows, v.shape[1], self.capacity, v.shape[3])))

    def absorb(self, prefill: Any, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Copy each row of a left-padded prefill cache (a ``DynamicCache``) into its slot."""
        layers = _layer_tensors(prefill)
        if not self.ready:
            self.allocate(layers)
        for (k, v), kk, vv in zip(layers, self.key_slots, self.value_slots, strict=True):
            padded = k.shape[2]
            for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
                kk[slot, :, :n] = k[row, :, padded - n :]
                vv[slot, :, :n] = v[row, :, padded - n :]
        for slot, n in zip(slots, lengths, strict=True):
            self.lengths[slot] = n

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` onto slot ``dst`` (compacting after ``dst``'s row finished)."""
        n = self.lengths[src]
        for kk, vv in zip(self.key_slots, self.value_slots, strict=True):
            kk[dst, :, :n] = kk[src, :, :n]
            vv[dst, :, :n] = vv[src, :, :n]
        self.lengths[dst] = n

    def step(self, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Prepare a decode step for the first ``n`` rows: their positions, and the key span."""
        pos = torch.tensor(self.lengths[:n], dtype=torch.long, device=device)
        self._n = n
        self._span = max(self.lengths[:n]) + 1
        self._index = torch.arange(n, device=device)
        self._pos = pos
        return pos, self._span

    def advance(self) -> None:
        for i in range(self._n):
            self.lengths[i] += 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kk, vv = self.key_slots[layer_idx], self.value_slots[layer_idx]
        kk[self._index, :, self._pos] = key_states[:, :, 0]
        vv[self._index, :, self._pos] = value_states[:, :, 0]
        return kk[: self._n, :, : self._span], vv[: self._n, :, : self._span]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return max(self._span - 1, 0)

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        return self._span, 0


class Engine:
    """Generates for one loaded model.  Not thread-safe: one engine per worker process."""

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
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = settings or get_settings()
        self.worker = worker
        cfg = loaded.profile.engine
        self.max_batch_tokens = max_batch_tokens or cfg.max_batch_tokens
        configured = cfg.max_batch_size
        self.max_batch_size = max_batch_size or (
            configured if isinstance(configured, int) else DEFAULT_BATCH_SIZE
        )
        self.oom_ceiling: int | None = None
        """The largest number of rows known to fit after an out-of-memory error."""
        self.device = next(self.model.parameters()).device if loaded.device == "cuda" else torch.device("cpu")
        self.defaults = loaded.profile.default_params
        self.ignore_eos = ignore_eos
        """Benchmarks: rows stop only at ``max_new_tokens`` (or a stop string), never at EOS."""
        self.eos = set(loaded.eos_token_ids)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.log = get_logger(profile=loaded.profile.name, mode=loaded.mode)
        self.cache_kw = _cache_keyword(self.model)
        self.threads = _configure_threads(self.settings) if self.device.type == "cpu" else None
        self.packed_layers = pack_linear_weights(self.model) if self.device.type == "cpu" else 0
        self.attention = _fast_attention(self.model)
        """``sdpa``/``eager`` when the slot cache and custom masks apply, else None (plain loop)."""
        self.autotuned: dict[str, Any] | None = None
        self._sink: ResultCallback | None = None
        self._stop: Callable[[], bool] | None = None
        self.log.info(
            "engine_ready",
            threads=self.threads,
            packed_linear_layers=self.packed_layers,
            decode=f"slots/{self.attention}" if self.attention else "simple",
            max_batch_size=self.max_batch_size,
        )

    # --- preparing ---------------------------------------------------------------------------

    def render(self, item: Item, system_prompt: str | None = None) -> tuple[str, bool]:
        """The text to tokenise, and whether it already contains the special tokens."""
        if item.messages is not None or system_prompt:
            messages = (
                [m.model_dump() for m in item.messages]
                if item.messages is not None
                else [{"role": "user", "content": item.prompt or ""}]
            )
            if system_prompt and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return str(text), True
        return item.prompt or "", False

    def prepare(
        self, item: Item, job_params: GenParams | None = None, system_prompt: str | None = None
    ) -> Prepared:
        params = item.params.over(job_params or GenParams()).over(self.defaults)
        self._inject_poison(item)
        text, templated = self.render(item, system_prompt)
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        context = self.loaded.context_length
        if not ids:
            raise GenerationError("the prompt is empty after tokenisation")
        if len(ids) >= context:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens; the context of {self.loaded.profile.name} is {context} "
                "tokens, and at least one is needed for the completion"
            )
        wanted = int(params.max_new_tokens or 1)
        max_new = min(wanted, context - len(ids))
        return Prepared(item=item, ids=list(ids), params=params, max_new=max_new, clipped=max_new < wanted)

    def _inject_poison(self, item: Item) -> None:
        marker = self.settings.fault_poison_marker
        if marker and marker in (item.prompt or "") + "".join(m.content for m in item.messages or []):
            self.log.warning("fault_poison_item", item=item.id)
            os.kill(os.getpid(), signal.SIGKILL)

    # --- scheduling --------------------------------------------------------------------------

    def batch_limit(self) -> int:
        """The most rows decoded together."""
        return min(self.max_batch_size, self.oom_ceiling or self.max_batch_size)

    def micro_batches(self, prepared: Sequence[Prepared]) -> Iterator[list[Prepared]]:
        """Length-sorted micro-batches of up to ``REFILL_FACTOR × batch_limit()`` items whose rows
        (``batch_limit()`` at a time) stay within the token cap."""
        ordered = sorted(prepared, key=lambda p: (len(p.ids), p.max_new))
        limit = self.batch_limit()
        batch: list[Prepared] = []
        longest = new = 0
        for prep in ordered:
            l2, n2 = max(longest, len(prep.ids)), max(new, prep.max_new)
            rows = min(len(batch) + 1, limit)
            if batch and (len(batch) >= REFILL_FACTOR * limit or (l2 + n2) * rows > self.max_batch_tokens):
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
                early.append(self._error(item, exc, attempts))
        emit(early)
        pending = list(self.micro_batches(prepared))
        self._sink, self._stop = emit, should_stop
        try:
            while pending:
                batch = [p for p in pending.pop(0) if p.item.index not in out]
                if not batch:
                    continue
                if should_stop and should_stop():
                    waiting = len(batch) + sum(map(len, pending))
                    raise ShutdownRequested(f"stopping with {waiting} items not started")
                rows = self.rows_for(batch)
                try:
                    emit(self._run_batch(batch, attempts))
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    self._after_oom()
                    left = [p for p in batch if p.item.index not in out]
                    if not left:
                        continue
                    if len(left) == 1:
                        err = OutOfMemory(f"out of memory with one item: {exc}")
                        emit([self._error(left[0].item, err, attempts)])
                        continue
                    if rows > 1:  # fewer rows at a time
                        half = (rows + 1) // 2
                        self.oom_ceiling = half if self.oom_ceiling is None else min(self.oom_ceiling, half)
                        pending.insert(0, left)
                    else:  # one row at a time still fails: split to find the item
                        mid = (len(left) + 1) // 2
                        pending[:0] = [left[:mid], left[mid:]]
                    self.log.warning(
                        "oom_backoff",
                        rows=rows,
                        new_limit=self.oom_ceiling,
                        left=len(left),
                        error=str(exc)[:200],
                    )
        finally:
            self._sink = self._stop = None
        return [out[i.index] for i in items]

    # --- one micro-batch ---------------------------------------------------------------------

    def _after_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _error(self, item: Item, exc: GenqError, attempts: int) -> ItemResult:
        return error_result(
            item,
            ErrorInfo(type=exc.code, message=exc.message),
            profile=self.loaded.profile.name,
            mode=self.loaded.mode,
            worker=self.worker,
            attempts=attempts,
        )

    def _run_batch(self, batch: list[Prepared], attempts: int) -> list[ItemResult]:
        """Results for one micro-batch.  Finished rows also go to the current ``generate`` call's
        results as soon as they finish."""
        rows = self.rows_for(batch)
        limit = self.settings.fault_oom_above
        if limit is not None and rows > limit:
            raise OutOfMemory(f"injected: micro-batch of {rows} rows > {limit}")
        results: list[ItemResult] = []

        def finished(done: list[_Row]) -> None:
            res = [self._result(row, attempts) for row in done]
            results.extend(res)
            if self._sink is not None and res:
                self._sink(res)

        with torch.inference_mode():
            if self.attention:
                self._continuous(batch, rows, finished)
            else:
                for s in range(0, len(batch), rows):
                    if s and self._stop is not None and self._stop():
                        raise ShutdownRequested(f"stopping with {len(batch) - s} items not started")
                    group = [_Row(prep=p, generator=self._generator(p.params)) for p in batch[s : s + rows]]
                    self._decode_simple(group)
                    finished(group)
        if self.settings.fault_slow_ms:
            time.sleep(self.settings.fault_slow_ms / 1000)
        return results

    def _generator(self, params: GenParams) -> torch.Generator | None:
        if not params.temperature:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return gen

    # --- continuous batching over the slot cache ---------------------------------------------

    def _continuous(self, batch: list[Prepared], slots: int, finished: Callable[[list[_Row]], None]) -> None:
        """Decode ``batch`` with ``slots`` rows at a time, refilling freed rows from the queue."""
        queue = deque(sorted(batch, key=lambda p: (len(p.ids), p.max_new)))
        cache = SlotCache(slots, capacity=max(len(p.ids) + p.max_new for p in batch))
        active: list[_Row] = []
        tokens: list[int] = []  # each active row's last token, the next step's input
        refill_at = max(1, slots // 8)
        stopping = False
        refill = False  # the first admission was checked by generate()
        while queue or active:
            free = slots - len(active)
            if queue and not stopping and free >= min(refill_at, len(queue)):
                if refill and self._stop is not None and self._stop():
                    stopping = True
                else:
                    refill = True
                    admit = [queue.popleft() for _ in range(min(free, len(queue)))]
                    rows = [_Row(prep=p, generator=self._generator(p.params)) for p in admit]
                    first = self._prefill(rows, cache, len(active))
                    active += rows
                    tokens += first
                    self._settle(active, tokens, cache, range(len(active) - len(rows), len(active)), finished)
                    continue  # admitting may have freed rows again
            if not active:
                break
            n = len(active)
            pos, span = cache.step(n, self.device)
            mask = self._decode_mask(pos, span)
            step = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            out = self.model(
                input_ids=step,
                attention_mask=mask,
                position_ids=pos.unsqueeze(1),
                use_cache=True,
                **{self.cache_kw: cache},
            )
            cache.advance()
            tokens = self._pick(out.logits[:, -1, :].float(), active)
            self._settle(active, tokens, cache, range(n), finished)
        if queue:
            raise ShutdownRequested(f"stopping with {len(queue)} items not started")

    def _settle(
        self,
        active: list[_Row],
        tokens: list[int],
        cache: SlotCache,
        fresh: range,
        finished: Callable[[list[_Row]], None],
    ) -> None:
        """Record ``tokens`` for the rows in ``fresh``; drop finished rows, compacting the slots."""
        done: list[int] = []
        for i in fresh:
            row = active[i]
            row.tokens.append(tokens[i])
            if self._finished(row, tokens[i]):
                row.done_at = time.perf_counter()
                done.append(i)
        if not done:
            return
        finished([active[i] for i in done])
        for i in reversed(done):  # highest first: the last row is always one that stays
            last = len(active) - 1
            if i != last:
                cache.move(last, i)
                active[i], tokens[i] = active[last], tokens[last]
            active.pop()
            tokens.pop()

    def _prefill(self, rows: list[_Row], cache: SlotCache, first_slot: int) -> list[int]:
        """Prefill ``rows`` (sorted by length) in groups; fill slots from ``first_slot``; first tokens."""
        from transformers import DynamicCache

        picks: list[int] = []
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and len(rows[end].prep.ids) * (end + 1 - start) <= PREFILL_TOKENS:
                end += 1
            group = rows[start:end]
            ids, mask, positions = self._left_pad([r.prep.ids for r in group])
            prefill = DynamicCache()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_kw: prefill},
            )
            cache.absorb(
                prefill, range(first_slot + start, first_slot + end), [len(r.prep.ids) for r in group]
            )
            picks += self._pick(out.logits[:, -1, :].float(), group)
            del out, prefill
            start = end
        return picks

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _decode_mask(self, pos: torch.Tensor, span: int) -> torch.Tensor:
        """[rows, 1, 1, span]: row ``i`` sees its keys ``0 … pos[i]`` (bool for sdpa, additive for eager)."""
        visible = torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)
        visible = visible[:, None, None, :]
        if self.attention == "sdpa":
            return visible
        dtype = self._compute_dtype()
        return torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )

    def _compute_dtype(self) -> torch.dtype:
        dtype = getattr(self.model, "dtype", torch.float32)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    # --- the plain loop (models the slot cache does not fit) ----------------------------------

    def _decode_simple(self, rows: list[_Row]) -> None:
        """Prefill then decode step by step with a ``DynamicCache``; rows leave when they finish."""
        from transformers import DynamicCache

        ids, mask, positions = self._left_pad([r.prep.ids for r in rows])
        cache = DynamicCache()
        live = list(range(len(rows)))
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: cache},
        )
        last_pos = positions[:, -1:]
        while True:
            next_tokens = self._pick(out.logits[:, -1, :].float(), [rows[i] for i in live])
            keep: list[int] = []
            for pos, (i, tok) in enumerate(zip(live, next_tokens, strict=True)):
                row = rows[i]
                row.tokens.append(tok)
                if self._finished(row, tok):
                    row.done_at = time.perf_counter()
                else:
                    keep.append(pos)
            if not keep:
                return
            step = torch.tensor([[next_tokens[p]] for p in keep], dtype=torch.long, device=self.device)
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                for layer in getattr(cache, "layers", []):
                    layer.batch_select_indices(index)
                mask = mask.index_select(0, index)
                last_pos = last_pos.index_select(0, index)
                live = [live[p] for p in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=step,
                attention_mask=mask,
                position_ids=last_pos,
                use_cache=True,
                **{self.cache_kw: cache},
            )

    # --- choosing and finishing ---------------------------------------------------------------

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Next token per row: argmax for greedy rows, seeded sampling for the others."""
        chosen = logits.argmax(dim=-1).tolist()
        for r, row in enumerate(rows):
            params = row.prep.params
            if row.generator is None:
                continue
            scores = logits[r].cpu() / float(params.temperature or 1.0)
            if params.top_k:
                kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs, order = torch.sort(torch.softmax(scores, dim=-1), descending=True)
            cdf = probs.cumsum(0)
            top_p = float(params.top_p if params.top_p is not None else 1.0)
            if top_p < 1.0:
                cut = int(torch.searchsorted(cdf, torch.tensor(top_p)).item()) + 1
                probs, order, cdf = probs[:cut], order[:cut], probs[:cut].cumsum(0)
            u = torch.rand((), generator=row.generator) * cdf[-1]
            pick = min(int(torch.searchsorted(cdf, u.reshape(1)).item()), len(order) - 1)
            chosen[r] = int(order[pick])
        return chosen

    def _finished(self, row: _Row, token: int) -> bool:
        if token in self.eos and not self.ignore_eos:
            row.finish = "stop"
            return True
        stops = row.prep.params.stop
        if stops:
            tail = self.tokenizer.decode(row.tokens[-(max(map(len, stops)) + 8) :], skip_special_tokens=True)
            if any(s in tail for s in stops):
                row.finish = "stop"
                return True
        if len(row.tokens) >= row.prep.max_new:
            row.finish = "length"
            return True
        return False

    def _result(self, row: _Row, attempts: int) -> ItemResult:
        tokens = row.tokens
        if tokens and tokens[-1] in self.eos and row.finish == "stop":
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in row.prep.params.stop or []:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
                row.finish = "stop"
        return ItemResult(
            index=row.prep.item.index,
            id=row.prep.item.id,
            line=row.prep.item.line,
            status=ItemStatus.OK,
            text=text,
            finish_reason=FinishReason.STOP if row.finish == "stop" else FinishReason.LENGTH,
            usage=Usage(prompt_tokens=len(row.prep.ids), completion_tokens=len(row.tokens)),
            profile=self.loaded.profile.name,
            mode=self.loaded.mode,
            worker=self.worker,
            attempts=attempts,
            latency_ms=round(((row.done_at or time.perf_counter()) - row.started) * 1000, 2),
        )

    # --- measuring the batch size -------------------------------------------------------------

    def autotune(
        self,
        candidates: Sequence[int] = AUTOTUNE_CANDIDATES,
        *,
        context: int = AUTOTUNE_CONTEXT,
        steps: int = 3,
        use_cache: bool = True,
    ) -> int:
        """Measure decode throughput at each candidate batch size and set ``max_batch_size`` to the
        smallest within ``AUTOTUNE_TOLERANCE`` of the best.  A few decode steps per size, on a cache
        filled with ``context`` tokens per row; sizes over the token cap are skipped, and the search
        stops at the first out-of-memory or when a bigger batch stops paying.  The result is cached
        under ``GENQ_HOME/autotune.json`` per model shape, mode, device and thread count."""
        context = max(1, min(context, self.loaded.context_length - steps - 2))
        sizes = sorted(
            {c for c in candidates if c > 0 and c * (context + steps + 2) <= self.max_batch_tokens}
        )
        if not sizes:
            sizes = [1]
        key = self._autotune_key(sizes, context, steps)
        path = self.settings.home / "autotune.json"
        if use_cache:
            try:
                saved = json.loads(path.read_text()).get(key)
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict) and isinstance(saved.get("batch_size"), int):
                self.max_batch_size = int(saved["batch_size"])
                self.autotuned = {**saved, "cached": True}
                self.log.info("autotune_cached", batch_size=self.max_batch_size)
                return self.max_batch_size
        started = time.perf_counter()
        table: dict[int, float] = {}
        if self.attention:
            table = search_batch_sizes(sizes, lambda size: self._time_decode(size, context, steps))
            if len(table) < len(sizes):
                self._after_oom()
        choice = pick_batch_size(table)
        self.max_batch_size = choice
        self.autotuned = {
            "batch_size": choice,
            "tokens_per_second": {str(s): round(t, 2) for s, t in table.items()},
            "context": context,
            "seconds": round(time.perf_counter() - started, 2),
            "cached": False,
        }
        self.log.info("autotuned", **self.autotuned)
        if use_cache:
            with contextlib.suppress(OSError, ValueError):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    everything = json.loads(path.read_text())
                except (OSError, ValueError):
                    everything = {}
                everything[key] = {k: v for k, v in self.autotuned.items() if k != "cached"}
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
                os.replace(tmp, path)
        return choice

    def _autotune_key(self, sizes: Sequence[int], context: int, steps: int) -> str:
        config = getattr(self.model, "config", None)
        shape = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name()
        blob = json.dumps(
            {
                "shape": {k: v for k, v in shape.items() if isinstance(v, int | float | str | bool)},
                "mode": self.loaded.mode,
                "adapter": self.loaded.adapter,
                "device": where,
                "threads": torch.get_num_threads(),
                "packed": self.packed_layers > 0,
                "torch": torch.__version__,
                "sizes": list(sizes),
                "context": context,
                "steps": steps,
                "v": 2,  # bump when the search changes: cached choices are then measured again
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _time_decode(self, rows: int, context: int, steps: int) -> float:
        """Tokens per second of decode steps with ``rows`` rows of ``context`` cached tokens."""
        from transformers import DynamicCache

        with torch.inference_mode():
            ids, mask, positions = self._left_pad([[self.pad_id] * 2])
            probe = DynamicCache()
            self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_kw: probe},
            )
            cache = SlotCache(rows, capacity=context + steps + 2)
            cache.allocate(_layer_tensors(probe))
            del probe
            cache.lengths = [context] * rows
            gen = torch.Generator().manual_seed(rows)
            vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 1000) or 1000)
            timings: list[float] = []
            for _ in range(steps + 1):
                step = torch.randint(0, vocab, (rows, 1), generator=gen).to(self.device)
                self._sync()
                t0 = time.perf_counter()
                pos, span = cache.step(rows, self.device)
                out = self.model(
                    input_ids=step,
                    attention_mask=self._decode_mask(pos, span),
                    position_ids=pos.unsqueeze(1),
                    use_cache=True,
                    **{self.cache_kw: cache},
                )
                out.logits[:, -1, :].float().argmax(dim=-1).tolist()
                self._sync()
                timings.append(time.perf_counter() - t0)
                cache.lengths = [context] * rows  # same span every step
            del cache, out
        return rows / min(timings[1:])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- choosing the batch size -------------------------------------------------------------------


def search_batch_sizes(sizes: Sequence[int], measure: Callable[[int], float]) -> dict[int, float]:
    """Tokens per second per batch size, smallest first, as far as it pays: the search stops at
    the first out-of-memory error, or after two sizes in a row that did not beat every smaller
    size by more than 2%."""
    table: dict[int, float] = {}
    paid: list[bool] = []
    for size in sorted(sizes):
        best_before = max(table.values(), default=0.0)
        try:
            table[size] = measure(size)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            break
        paid.append(table[size] > best_before * 1.02)
        if len(paid) >= 3 and not paid[-1] and not paid[-2]:
            break
    return table


def pick_batch_size(table: dict[int, float]) -> int:
    """The smallest size within ``AUTOTUNE_TOLERANCE`` of the best throughput (smaller batches
    finish sooner and hold less memory); ``DEFAULT_BATCH_SIZE`` with nothing measured."""
    if not table:
        return DEFAULT_BATCH_SIZE
    best = max(table.values())
    return min(s for s, tps in table.items() if tps >= AUTOTUNE_TOLERANCE * best)


# --- model preparation ------------------------------------------------------------------------


def _layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a filled ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_keyword(model: Any) -> str:
    """transformers 5 calls the KV cache argument ``cache``; 4.x called it ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _fast_attention(model: Any) -> str | None:
    """``sdpa`` or ``eager`` when the slot cache and a 4-D mask express this model's attention."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return None
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    return str(impl)


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


def _configure_threads(settings: Settings) -> int:
    """torch intra-op threads: ``GENQ_THREADS`` when set, else one per physical core."""
    wanted = settings.threads or physical_cores()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


class PackedLinear(torch.nn.Linear):
    """``nn.Linear`` with a oneDNN-prepacked copy of its weight for products of few rows.

    Decode steps multiply a handful of rows by every weight matrix; oneDNN's blocked weight layout
    does that much faster than the default BLAS call, which stays in use (on ``weight``) for large
    products such as prefill, where it is faster.  ``weight`` and the module's state are unchanged.
    """

    packed_weight: torch.Tensor
    packed_max_rows: int = PACKED_MAX_ROWS
    """Products of up to this many rows use ``packed_weight`` (see :func:`packed_crossover`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.numel() <= self.packed_max_rows * self.in_features
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed_weight, self.bias, "none", [], ""
            )
        return torch.nn.functional.linear(x, self.weight, self.bias)


def pack_linear_weights(model: Any, *, min_free_fraction: float = 0.5) -> int:
    """Give every plain fp32 ``nn.Linear`` on the CPU a prepacked weight (see :class:`PackedLinear`).

    Idempotent; returns how many layers are packed.  Skipped (0) when oneDNN is missing, when the
    copies would take more than ``min_free_fraction`` of the available RAM, or when the packed
    layer does not reproduce the plain one."""
    already = sum(1 for m in model.modules() if isinstance(m, PackedLinear))
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
            probe = targets[0]
            packed = torch.ops.mkldnn._reorder_linear_weight(probe.weight.detach())
            x = torch.randn(3, probe.in_features)
            ref = torch.nn.functional.linear(x, probe.weight, probe.bias)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, probe.bias, "none", [], "")
            if not torch.allclose(ref, got, rtol=1e-3, atol=1e-4):
                log.warning("linear_packing_mismatch", max_diff=float((ref - got).abs().max()))
                return 0
            for module in targets:
                module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
                module.__class__ = PackedLinear
            layers = [m for m in targets if isinstance(m, PackedLinear)]
            crossover = packed_crossover(_typical(layers))
            for layer in layers:
                layer.packed_max_rows = crossover
            log.info("linear_packed", layers=len(targets), packed_max_rows=crossover)
    except RuntimeError as exc:  # an op missing from this torch build
        for module in targets:
            if isinstance(module, PackedLinear):
                del module.packed_weight
                module.__class__ = torch.nn.Linear  # type: ignore[assignment]
        log.warning("linear_packing_failed", error=str(exc)[:200])
        return 0
    return len(targets)


def packed_crossover(
    layer: PackedLinear,
    probe_rows: Sequence[int] = PACKED_PROBE_ROWS,
    timer: Callable[[Callable[[], Any]], float] | None = None,
) -> int:
    """The most rows for which ``layer``'s prepacked weight is still faster than BLAS: timed at
    each of ``probe_rows`` (best of three, by ``timer``), stopping at the first size where BLAS
    wins.  Never below ``PACKED_MAX_ROWS`` (decode-sized products, where packing always won);
    a value past the largest probe (no limit in practice) if the packed weight wins at all."""
    clock = timer or _best_time
    chosen = PACKED_MAX_ROWS
    with torch.inference_mode():
        for rows in sorted(probe_rows):
            x = torch.randn(rows, layer.in_features)

            def blas(x: torch.Tensor = x) -> torch.Tensor:
                return torch.nn.functional.linear(x, layer.weight, layer.bias)

            def packed(x: torch.Tensor = x) -> torch.Tensor:
                return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none", [], "")

            if clock(packed) >= clock(blas):
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


def _best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def build_engine(loaded: Loaded, **kwargs: Any) -> Engine:
    """The engine a worker runs: :class:`Engine` with the profile's batch size, measured by
    :meth:`Engine.autotune` (once per machine, then cached) when the profile says ``auto``."""
    engine = Engine(loaded, **kwargs)
    if loaded.profile.engine.max_batch_size == "auto" and "max_batch_size" not in kwargs:
        engine.autotune()
    return engine


def generate(loaded: Loaded, items: Sequence[Item], **kwargs: Any) -> list[ItemResult]:
    """One-shot convenience: ``Engine(loaded).generate(items)``."""
    return Engine(loaded).generate(items, **kwargs)
