"""The plain left-padded decode loop, for models the slot cache does not fit.

Sliding-window attention, or attention kernels other than sdpa/eager, cannot be driven by the
slot cache's per-row masks.  Such models decode a group of rows the way ``generate`` does: prefill
left-padded, then one token per step with a ``DynamicCache``; rows that finish are dropped from the
cache (``batch_select_indices``) but not refilled.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from worker.engine.forward import Forward
from worker.engine.rows import Row, RowRules


def decode_padded(forward: Forward, rules: RowRules, rows: list[Row]) -> None:
    """Prefill then decode ``rows`` step by step until every row is done."""
    ids, mask, positions = forward.left_pad([r.prep.ids for r in rows])
    cache = DynamicCache()
    live = list(range(len(rows)))
    logits = forward(ids, mask, positions, cache, last_only=True, adapters=[r.prep.adapter for r in rows])
    last_pos = positions[:, -1:]
    device = forward.device
    while True:
        next_tokens = rules.pick(logits, [rows[i] for i in live])
        keep = [
            p for p, (i, tok) in enumerate(zip(live, next_tokens, strict=True)) if not rules.add(rows[i], tok)
        ]
        if not keep:
            return
        step = torch.tensor([[next_tokens[p]] for p in keep], dtype=torch.long, device=device)
        if len(keep) < len(live):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            for layer in getattr(cache, "layers", []):
                layer.batch_select_indices(index)
            mask = mask.index_select(0, index)
            last_pos = last_pos.index_select(0, index)
            live = [live[p] for p in keep]
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], dim=1)
        last_pos = last_pos + 1
        logits = forward(step, mask, last_pos, cache, adapters=[rows[i].prep.adapter for i in live])
