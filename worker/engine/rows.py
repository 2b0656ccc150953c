"""A row in flight (an item being decoded) and the rules that extend and end it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from worker.core.errors import GenqError
from worker.core.schema import ErrorInfo, Item, ItemResult, Usage, error_result
from worker.core.states import FinishReason, ItemStatus, Mode
from worker.engine.prompts import Prepared, Tokenizer
from worker.engine.sampling import choose_tokens, make_generator, result_text, stop_reason, stop_string

if TYPE_CHECKING:
    from worker.engine.shaping import RowExtras, Shaper


@dataclass
class Row:
    """One item being decoded: its tokens so far, its sampler and its clock."""

    prep: Prepared
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.perf_counter)
    done_at: float = 0.0
    extras: RowExtras | None = None
    """Constraint, logprobs, penalties (:mod:`worker.engine.shaping`); set at the first step."""

    @classmethod
    def start(cls, prep: Prepared) -> Row:
        return cls(prep=prep, generator=make_generator(prep.params))


class RowRules:
    """Next tokens and finishing for the rows of one model (its tokenizer and end-of-sequence ids)."""

    def __init__(self, tokenizer: Tokenizer, eos: Sequence[int], *, ignore_eos: bool = False) -> None:
        self.tokenizer = tokenizer
        self.eos = frozenset(eos)
        self.ignore_eos = ignore_eos
        """Benchmarks: rows stop only at ``max_new_tokens`` (or a stop string), never at EOS."""
        self.shaper: Shaper | None = None
        """Penalties, JSON constraints and logprobs (set by the engine)."""

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pick(self, logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
        """Next token per row of ``logits`` ([rows, vocab], float)."""
        raw = self.shaper.shape(logits, rows) if self.shaper is not None else None
        chosen = choose_tokens(logits, [r.prep.params for r in rows], [r.generator for r in rows])
        if raw is not None and self.shaper is not None:
            self.shaper.record(raw, chosen, rows)
        return chosen

    def add(self, row: Row, token: int) -> bool:
        """Append ``token`` to ``row``; True (and ``row.finish`` set) when the row is done."""
        row.tokens.append(token)
        reason = self.shaper.advance(row, token) if self.shaper is not None else None
        reason = reason or stop_reason(
            row.tokens,
            max_new=row.prep.max_new,
            eos=self.eos,
            stops=row.prep.params.stop,
            decode=self.decode,
            ignore_eos=self.ignore_eos,
        )
        if reason is None:
            return False
        row.finish = reason
        row.done_at = time.perf_counter()
        return True


class Results:
    """Item results stamped with the profile, mode and worker."""

    def __init__(self, rules: RowRules, *, profile: str, mode: Mode, worker: str | None) -> None:
        self.rules = rules
        self.profile = profile
        self.mode = mode
        self.worker = worker
        self.model: str | None = None
        """The base model and adapter that answer (``base:adapter``), set by the engine."""
        self.models: dict[str, str] = {}
        """With several adapters: each adapter's ``base:adapter``, by its name."""
        self.record_adapter = False
        """Results name the adapter that answered (profiles with several ``adapters``)."""

    def adapter(self, item: Item, used: str | None) -> str | None:
        return used if self.record_adapter or item.adapter is not None else None

    def ok(self, row: Row, attempts: int) -> ItemResult:
        text, reason = result_text(
            row.tokens, row.finish, eos=self.rules.eos, stops=row.prep.params.stop, decode=self.rules.decode
        )
        row.finish = reason
        item = row.prep.item
        stops = row.prep.params.stop
        rules = self.rules
        matched = stop_string(row.tokens, eos=rules.eos, stops=stops, decode=rules.decode) if stops else None
        shaper = self.rules.shaper
        extra = shaper.result_fields(row, text, reason) if shaper is not None else {}
        return ItemResult(
            index=item.index,
            id=item.id,
            line=item.line,
            status=ItemStatus.OK,
            text=text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(row.prep.ids), completion_tokens=len(row.tokens)),
            profile=self.profile,
            mode=self.mode,
            worker=self.worker,
            attempts=attempts,
            latency_ms=round(((row.done_at or time.perf_counter()) - row.started) * 1000, 2),
            model=self.models.get(row.prep.adapter or "", self.model),
            adapter=self.adapter(item, row.prep.adapter),
            stop_sequence=matched,
            **extra,
        )

    def error(self, item: Item, exc: GenqError, attempts: int) -> ItemResult:
        return error_result(
            item,
            ErrorInfo(type=exc.code, message=exc.message),
            profile=self.profile,
            mode=self.mode,
            worker=self.worker,
            attempts=attempts,
            model=self.models.get(item.adapter or "", self.model),
            adapter=item.adapter,
        )
