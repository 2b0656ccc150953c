"""Turn a list of items into results: batching, per-item sampling, stops, OOM back-off.

``Engine(loaded).generate(items)`` runs its own decode loop over the model's forward pass rather
than ``model.generate``: it needs per-row parameters (temperature, top-p, top-k, seed, stop strings
and length differ between the rows of one batch), per-row results as soon as each row ends, and
rows that leave the batch as soon as they finish, their place taken by the next item.

* Items are tokenised once, sorted (by shared prefix, then prompt length) and cut into
  micro-batches (up to ``4 × batch_limit()`` items).  A micro-batch runs with ``batch_limit()`` rows at a time
  (fewer if ``max_batch_tokens`` — rows × (prompt + new tokens) — says so): continuous batching.
  When rows finish, the next items of the micro-batch are prefilled and take their places.
* Every row has a preallocated slot in a per-batch KV cache (:class:`SlotCache`).  Prefill runs in
  length-sorted groups of about ``PREFILL_TOKENS`` tokens — packed end to end, unpadded, through
  the engine's own pass (:mod:`worker.engine.llama`), else left-padded — writing each row's keys
  and values straight into its slot, unpadded, with the logits of the last position only; a
  decode step writes every row's new key and value at that row's own position and attends over a
  per-row mask, so no step re-creates the cache (no ``torch.cat``) or depends on a neighbour's
  length.  Models whose attention this cannot express (sliding windows, attention kernels other
  than sdpa/eager) use the plain left-padded loop instead (:func:`worker.engine.padded.decode_padded`).
* Items that begin with the same tokens (a system prompt, an instruction: at least
  ``PREFIX_MIN_TOKENS``) share them: the prefix's keys and values are computed once per worker,
  kept by token ids (:class:`worker.engine.prefix.PrefixCache`), and copied into each such row's
  slot; only the rest of the prompt is prefilled.  Greedy output is the same with and without.
* Each layer's slots are allocated where that layer runs (a ``device_map`` may spread layers over
  GPUs and the CPU); inputs go to the embedding's device.
* On the CPU in fp32, plain ``nn.Linear`` layers get a oneDNN-prepacked copy of their weight,
  used for products of up to ``packed_max_rows`` rows: 1.2–2× faster than the default BLAS call
  for decode steps (8–128 rows) on the machines measured (docs/BENCHMARKS.md).  Whether it also
  wins for prefill-sized products differs between CPUs (a Xeon: BLAS from ~512 rows; an EPYC:
  oneDNN at every size), so the crossover is measured once when the weights are packed.
  Skipped when RAM is short.  Sibling layers that read the same input (query/key/value, gate/up)
  share one packed weight and one product (:class:`worker.engine.cpu.FusedLinear`, bit-for-bit the
  separate products; ``GENQ_FUSED_LINEAR=0``: off).  The worker applies this (and torch's thread
  count) explicitly, in :func:`build_engine`; the engine's constructor changes nothing outside the
  engine.
* ``max_batch_size: auto`` is measured once per model, mode and machine by :meth:`Engine.autotune`
  (a few decode steps per candidate size, cached under ``GENQ_HOME``).
* Greedy rows take the argmax.  Sampled rows draw from their own ``torch.Generator`` seeded by the
  item's ``seed``: an item gives the same text alone or in any batch.
* Out of memory halves the number of rows run together and retries what is not finished; an item
  that cannot run alone records ``out_of_memory``.  Too-long prompts record
  ``context_length_exceeded``.  One item's error never spoils its neighbours.

The modules, one job each:

=============  ====================================================================================
scheduler      :class:`Engine`: micro-batches, rows per batch, out-of-memory back-off, autotune entry
prompts        rendering (chat template, system prompt), tokenising, limits: ``prepare`` → ``Prepared``
sampling       next-token choice and stop rules, finish reason, result text: pure functions
rows           a row in flight, the rules that extend and end it, result building
forward        the model call: padded inputs, decode masks, the cache keyword, devices
slot_cache     :class:`SlotCache`: per-row slots, prefill and decode passes, per-layer devices
attention      decode attention over each row's live span: runs of rows of similar length per call
llama          the engine's own pass through a Llama-family decoder: fewer operations, same logits
slots          continuous batching over the slot cache, prefix copies
prefix         finding shared prefixes, keeping their keys and values
padded         the plain left-padded loop for models the slot cache does not fit
autotune       the batch-size search (pure), decode timing and its JSON cache
memory         recognising out-of-memory errors
cpu            packed linear weights, fused sibling products, thread count (by :func:`build_engine`)
faults         TEST ONLY fault injection, installed by :func:`build_engine` when a switch is set
build          :func:`build_engine`: the engine a worker runs
constraints    JSON schemas enforced while decoding: llguidance matchers per row, masks per batch
shaping        between logits and token: penalties, the constraint, logprobs (hooked into rows)
samples        ``n`` > 1: one row per sample, results merged into ``choices``
requests       attaches the above to an engine
=============  ====================================================================================
"""

from worker.engine.autotune import pick_batch_size, search_batch_sizes
from worker.engine.build import build_engine
from worker.engine.cpu import PACKED_MAX_ROWS, PackedLinear, pack_linear_weights, packed_crossover
from worker.engine.prompts import Prepared
from worker.engine.scheduler import Engine
from worker.engine.slot_cache import SlotCache

__all__ = [
    "PACKED_MAX_ROWS",
    "Engine",
    "PackedLinear",
    "Prepared",
    "SlotCache",
    "build_engine",
    "pack_linear_weights",
    "packed_crossover",
    "pick_batch_size",
    "search_batch_sizes",
]
