"""Between a row's logits and its next token: penalties, the JSON constraint, log-probabilities.

:class:`Shaper` is what :class:`worker.engine.rows.RowRules` calls for rows whose request asks for
more than plain sampling (``response_format``, ``logprobs``, ``presence_penalty``,
``frequency_penalty``).  Plain rows cost one attribute check per step; rows of every kind share
one batch.  For each step, in order:

1. the raw logits' log-softmax is kept for rows that want log-probabilities (the model's own
   distribution: before penalties, constraint and temperature);
2. penalties, OpenAI's rule: ``logit -= count × frequency_penalty + (count > 0) ×
   presence_penalty`` over the tokens the row has generated;
3. the JSON constraint masks every token the row's schema does not allow
   (:mod:`worker.engine.constraints`);

then, once the token is chosen, its log-probability and the top alternatives are recorded, and
the row's matcher advances (:meth:`Shaper.advance`): a complete answer ends the row (``stop``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from worker.core.logs import get_logger
from worker.core.schema import GenParams
from worker.core.states import FinishReason
from worker.core.structured import TokenLogprob, TopLogprob
from worker.engine.constraints import Constraints, Guide

if TYPE_CHECKING:
    from worker.engine.rows import Row


@dataclass
class RowExtras:
    """What a row needs beyond plain sampling."""

    guide: Guide | None = None
    logprobs: list[TokenLogprob] | None = None
    top: int = 0
    counts: Counter[int] | None = None
    """Tokens generated so far, for penalties."""
    broken: str = ""
    """Why the constraint failed (a matcher error): the row ends, ``json_valid: false``."""
    pending: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


PLAIN = RowExtras()
"""The marker of a row that needs nothing (checked once, at its first step)."""


def needs_extras(params: GenParams) -> bool:
    return bool(
        (params.response_format is not None and params.response_format.constrained)
        or params.logprobs
        or params.presence_penalty
        or params.frequency_penalty
    )


class Shaper:
    def __init__(self, constraints: Constraints) -> None:
        self.constraints = constraints
        self.log = get_logger()

    def check(self, params: GenParams) -> None:
        """Compile (or find) the row's schema before it runs: a schema no worker can enforce
        (only a hand-made item gets one past submit) raises InputError for that item."""
        fmt = params.response_format
        if fmt is not None and fmt.constrained:
            self.constraints.compiled(fmt)

    def extras(self, row: Row) -> RowExtras:
        """The row's extras, made at its first step."""
        if row.extras is None:
            row.extras = self._make(row.prep.params)
        return row.extras

    def _make(self, params: GenParams) -> RowExtras:
        if not needs_extras(params):
            return PLAIN
        fmt = params.response_format
        return RowExtras(
            guide=self.constraints.start(fmt) if fmt is not None and fmt.constrained else None,
            logprobs=[] if params.logprobs else None,
            top=int(params.top_logprobs or 0) if params.logprobs else 0,
            counts=Counter() if (params.presence_penalty or params.frequency_penalty) else None,
        )

    def shape(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor | None:
        """Apply penalties and constraints to ``logits`` in place; returns the raw log-softmax
        of the rows that want log-probabilities (None when no row does)."""
        extras = [self.extras(r) for r in rows]
        if all(e is PLAIN for e in extras):
            return None
        raw: torch.Tensor | None = None
        if any(e.logprobs is not None for e in extras):
            raw = torch.log_softmax(logits.float(), dim=-1)
        for i, (row, e) in enumerate(zip(rows, extras, strict=True)):
            if e.counts:
                self._penalise(logits, i, row.prep.params, e.counts)
        guided = [(i, e.guide) for i, e in enumerate(extras) if e.guide is not None and not e.broken]
        if guided:
            empty = self.constraints.mask(logits, [i for i, _ in guided], [g for _, g in guided])
            for k in empty:  # nothing allowed: the matcher failed; end the row (json_valid: false)
                i, guide = guided[k]
                extras[i].broken = guide.error or "no token is allowed"
                logits[i, self.constraints.eos[0] if self.constraints.eos else 0] = 0.0
        return raw

    @staticmethod
    def _penalise(logits: torch.Tensor, i: int, params: GenParams, counts: Counter[int]) -> None:
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        penalty = n * float(params.frequency_penalty or 0.0) + float(params.presence_penalty or 0.0)
        logits[i].index_add_(0, ids, -penalty)

    def record(self, raw: torch.Tensor | None, chosen: Sequence[int], rows: Sequence[Row]) -> None:
        """Keep each logprobs row's chosen token's log-probability and its top alternatives."""
        if raw is None:
            return
        for i, row in enumerate(rows):
            e = row.extras
            if e is None or e.logprobs is None:
                continue
            alternatives: list[tuple[int, float]] = []
            if e.top:
                values, ids = torch.topk(raw[i], e.top)
                alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
            e.pending.append((float(raw[i, chosen[i]]), alternatives))

    def advance(self, row: Row, token: int) -> FinishReason | None:
        """After ``token`` was added: count it, advance the matcher; ``stop`` when the answer is
        complete (or the matcher failed, which :meth:`result_fields` reports)."""
        e = row.extras
        if e is None or e is PLAIN:
            return None
        if e.counts is not None:
            e.counts[token] += 1
        if e.logprobs is not None and e.pending:
            logprob, alternatives = e.pending.pop(0)
            e.logprobs.append(self._entry(token, logprob, alternatives))
        guide = e.guide
        if guide is None or e.broken:
            return FinishReason.STOP if e.broken else None
        if token in self.constraints.eos and guide.accepting:
            return FinishReason.STOP
        started = time.perf_counter()
        consumed = guide.consume(token)
        self.constraints.seconds += time.perf_counter() - started
        if not consumed:
            e.broken = guide.error or f"token {token} was not allowed"
            self.log.warning("constraint_failed", item=row.prep.item.id, error=e.broken[:200])
            return FinishReason.STOP
        return FinishReason.STOP if guide.complete else None

    def _entry(self, token: int, logprob: float, alternatives: list[tuple[int, float]]) -> TokenLogprob:
        raw = self.constraints.token_bytes(token)
        return TokenLogprob(
            token=raw.decode("utf-8", errors="replace"),
            logprob=logprob,
            bytes=list(raw),
            top_logprobs=[self._top(t, lp) for t, lp in alternatives],
        )

    def _top(self, token: int, logprob: float) -> TopLogprob:
        raw = self.constraints.token_bytes(token)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    def result_fields(self, row: Row, text: str, reason: FinishReason) -> dict[str, Any]:
        """``logprobs`` and ``json_valid`` of a finished row's result."""
        e = row.extras
        if e is None or e is PLAIN:
            return {}
        out: dict[str, Any] = {}
        if e.logprobs is not None:
            logprobs = e.logprobs
            if row.tokens and row.tokens[-1] in self.constraints.eos and reason == FinishReason.STOP:
                logprobs = logprobs[:-1]  # the end-of-sequence token is not part of the text
            out["logprobs"] = logprobs
        if e.guide is not None:
            out["json_valid"] = reason == FinishReason.STOP and not e.broken and _parses(text)
        return out


def _parses(text: str) -> bool:
    """The answer is one JSON value (the constraint guarantees the schema; a stop string or a
    failure could still have cut it)."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
