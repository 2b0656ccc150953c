"""JSON output enforced while decoding: one llguidance matcher per row, masks per batch.

* The worker's vocabulary is turned into llguidance's token tables once, on the first row that
  needs them (:class:`Constraints`, lazily: a worker that never sees a ``response_format``
  never pays for it).
* A schema is compiled once per worker and cached by its digest
  (:meth:`worker.core.structured.ResponseFormat.key`): every item of a job that shares a schema,
  and every later job with the same schema, starts from a copy of the compiled matcher.
* Each decode step, :meth:`Constraints.mask` fills the allowed-token bitmask of every
  constrained row of the batch (in parallel, llguidance's executor) and sets the logits of
  every other token to ``-inf``; rows without a ``response_format`` in the same batch are left
  untouched.  After the token is chosen, :meth:`Guide.consume` advances the row's matcher; a
  matcher that can take nothing more but the end ends the row at once (``stop``).

So the model can only ever write a prefix of a valid answer: an answer that ends with ``stop``
is complete JSON satisfying its schema, whatever the model's weights (the tests use a random
model).  One cut short by ``max_tokens`` is ``length`` and ``json_valid: false``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker.core.errors import InputError
from worker.core.grammar import grammar_for
from worker.core.logs import get_logger
from worker.core.structured import ResponseFormat

CACHE_SIZE = 256
"""Compiled schemas kept per worker (least recently used dropped first)."""

PARALLEL_CPUS = 8
"""Fill a batch's masks with llguidance's thread pool from this many CPUs up.  On the 2-core
machine of docs/BENCHMARKS.md the pool took 10.9 ms a step for 64 rows, a plain loop 1.2 ms."""


class Guide:
    """One row's matcher."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """Advance by ``token``; False when the matcher cannot take it (an error state)."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Nothing but the end can follow: the answer is complete."""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting()) and not self.matcher.is_error()

    @property
    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""


class Constraints:
    """llguidance for one model's tokenizer: token tables, compiled schemas, batch masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = sorted(eos)
        self._tokenizer: Any = None
        self._executor: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        """Schemas compiled so far (tests check the cache with it)."""
        self.parallel = (os.cpu_count() or 1) >= PARALLEL_CPUS
        self.seconds = 0.0
        """Time spent computing and applying masks and advancing matchers (bench.structured)."""
        self.log = get_logger()

    @property
    def tokenizer(self) -> Any:
        """llguidance's tables for this vocabulary (built on first use, about a second for 150k
        tokens)."""
        if self._tokenizer is None:
            import llguidance
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos or None
            )
            self._executor = llguidance.LLExecutor()
        return self._tokenizer

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes a token stands for (b"" for special tokens)."""
        return bytes(self.tokenizer.decode_bytes([token]))

    def compiled(self, fmt: ResponseFormat) -> Any:
        """The compiled matcher of ``fmt``'s schema, from the cache when this worker has seen it."""
        key = fmt.key()
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
                return found
        import llguidance

        try:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar_for(fmt), log_level=0)
        except Exception as exc:  # llguidance refuses some inputs by raising
            raise InputError(f"cannot be enforced: {exc}", field="response_format") from None
        if matcher.is_error():  # submit checks every schema, so only a hand-made item gets here
            raise InputError(f"cannot be enforced: {matcher.get_error()}", field="response_format")
        with self._lock:
            self._compiled[key] = matcher
            self.compiles += 1
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        self.log.info("schema_compiled", schema=key, cached=len(self._compiled))
        return matcher

    def start(self, fmt: ResponseFormat) -> Guide:
        """A fresh matcher for one row."""
        return Guide(self.compiled(fmt).deep_copy())

    def mask(self, logits: torch.Tensor, rows: Sequence[int], guides: Sequence[Guide]) -> list[int]:
        """Set to ``-inf`` the logits of every token row ``rows[i]`` may not take next.

        The masks are filled by llguidance into one bitmask (in parallel on machines with
        :data:`PARALLEL_CPUS` or more CPUs; on fewer, the thread hand-off costs more than it
        saves), unpacked with numpy and applied in place: with numpy on a CPU tensor, one
        masked fill on another device.  Returns the positions (in ``rows``) of rows that may
        take no token at all (a matcher in an error state)."""
        started = time.perf_counter()
        try:
            return self._mask(logits, rows, guides)
        finally:
            self.seconds += time.perf_counter() - started

    def _mask(self, logits: torch.Tensor, rows: Sequence[int], guides: Sequence[Guide]) -> list[int]:
        words = (self.vocab_size + 31) // 32
        bitmask = np.zeros((len(rows), words), dtype=np.int32)
        self.fill(guides, bitmask)
        empty = [int(i) for i in np.flatnonzero(~bitmask.any(axis=1))]
        width = logits.shape[-1]
        blocked = ~np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width].view(np.bool_)
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            view = logits.detach().numpy()
            if len(rows) == view.shape[0] and list(rows) == list(range(len(rows))):
                np.copyto(view, -np.inf, where=blocked)  # every row constrained: one call
                return empty
            for i, r in enumerate(rows):
                np.copyto(view[r], -np.inf, where=blocked[i])
            return empty
        mask = torch.from_numpy(blocked).to(logits.device, non_blocking=True)
        index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
        picked = logits.index_select(0, index)
        picked.masked_fill_(mask, float("-inf"))
        logits.index_copy_(0, index, picked)
        return empty

    def fill(self, guides: Sequence[Guide], bitmask: np.ndarray) -> None:
        """Each guide's allowed tokens into its row of ``bitmask`` (one bit per token)."""
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        self.tokenizer  # noqa: B018 - builds the executor too
        if len(guides) > 1 and self.parallel:
            fill_next_token_bitmask_par(
                self._executor, [(g.matcher, i) for i, g in enumerate(guides)], bitmask
            )
            return
        for i, guide in enumerate(guides):
            fill_next_token_bitmask(guide.matcher, bitmask, i)
