"""Grammar-constrained decoding libraries side by side: llguidance, xgrammar, outlines-core.

    python -m bench.grammars [--json] [--rows 64] [--steps 48] [--tiny]

genq enforces JSON schemas with llguidance (its only dependency for that; see docs/BENCHMARKS.md
for why).  This benchmark is how the choice was made and lets anyone re-check it: the other two
libraries are measured when they are importable (``pip install xgrammar outlines-core`` into a
scratch environment: they are not genq dependencies), and left out otherwise.

For each library, on the benchmark model's tokenizer (32,000 tokens; ``--tiny``: the tiny
model's 1,024), with the four schemas of :data:`SCHEMAS` (nested objects, arrays with
``maxItems``, enums, numbers, booleans, strings with ``maxLength``):

* **setup_ms**: the per-tokenizer preparation a worker does once (vocabulary tables);
* **compile_ms**: from a schema to a matcher ready for its first row (median of the schemas);
  what a worker pays once per job's schema, then caches;
* **row_ms**: creating one more row's matcher from the compiled schema (paid per item);
* **mask_us**: microseconds per row and token to compute the row's allowed-token mask and advance
  the row by a token, with ``--rows`` rows in lockstep (each row with its own schema, the
  batch's masks filled the way the library offers for batches), tokens drawn at random among
  the allowed ones (seeded): what a random model does, the hardest case for a matcher;
* **imports_torch**: whether importing the library imports torch (genq's producer validates
  schemas at submit and must never import torch);
* **refused**: how each library answers a schema it cannot enforce (a look-behind pattern).

With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import emit, machine, table
from tests.schemas import SCHEMAS as TEST_SCHEMAS
from worker.engine.constraints import PARALLEL_CPUS

SCHEMAS: list[dict[str, Any]] = list(TEST_SCHEMAS.values())
"""The structured-output tests' four schemas (tests/schemas.py), measured as they are tested."""
UNSUPPORTED = {"type": "string", "pattern": "(?<=a)b"}


def allowed_ids(bits: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids whose bit is set in one row of a 32-bit-word mask."""
    unpacked = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(unpacked)


class Lib:
    """One library's adapter: setup, compile, one matcher per row, batched masks, advance."""

    name = ""

    def setup(self, tokenizer: Any, vocab: int) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def done(self, matcher: Any) -> bool:
        raise NotImplementedError

    def refusal(self) -> str:
        raise NotImplementedError


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()
        self.parallel = (os.cpu_count() or 1) >= PARALLEL_CPUS
        self.options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)  # type: ignore[arg-type]
        matcher = self.llg.LLMatcher(self.tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        if self.parallel:  # as genq does (worker/engine/constraints.py)
            fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        else:
            for i, m in enumerate(matchers):
                fill_next_token_bitmask(m, bitmask, i)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())

    def refusal(self) -> str:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(UNSUPPORTED)
        return self.llg.LLMatcher.validate_grammar(grammar).splitlines()[-1][:120]


class XGrammar(Lib):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        import torch

        mask = torch.from_numpy(bitmask)
        self.batch.batch_fill_next_token_bitmask(matchers, mask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated() or matcher.is_completed())

    def refusal(self) -> str:
        try:
            self.compiler.compile_json_schema(json.dumps(UNSUPPORTED))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return "accepted"


class OutlinesCore(Lib):
    name = "outlines-core"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import llguidance.hf  # only to read each token's exact bytes
        import outlines_core

        self.oc = outlines_core
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        eos = int(tokenizer.eos_token_id)
        tokens: dict[bytes, list[int]] = {}
        for i in range(len(tokenizer)):
            if i == eos or lltok.is_special_token(i):
                continue
            tokens.setdefault(lltok.decode_bytes([i]), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        width = bitmask.shape[1]
        for i, guide in enumerate(matchers):
            row = bitmask[i]
            guide.write_mask_into(row.ctypes.data, width, row.itemsize)

    def advance(self, matcher: Any, token: int) -> bool:
        matcher.advance(token)
        return True

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_finished())

    def refusal(self) -> str:
        try:
            self.compile(UNSUPPORTED)
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return "accepted"


LIBS: dict[str, Callable[[], Lib]] = {
    "llguidance": LLGuidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def imports_torch(module: str) -> bool | None:
    """Whether ``import module`` imports torch (None: not installed), in a fresh interpreter."""
    code = (
        f"import sys\ntry:\n import {module}\nexcept ImportError:\n sys.exit(3)\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return None if proc.returncode == 3 else proc.stdout.strip() == "True"


def measure(lib: Lib, tokenizer: Any, vocab: int, rows: int, steps: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    lib.setup(tokenizer, vocab)
    setup_ms = (time.perf_counter() - t0) * 1000
    compiled, compile_ms = [], []
    for schema in SCHEMAS:
        t0 = time.perf_counter()
        first = lib.compile(schema)
        lib.matcher(first)
        compile_ms.append((time.perf_counter() - t0) * 1000)
        compiled.append(first)
    t0 = time.perf_counter()
    matchers = [lib.matcher(compiled[r % len(compiled)]) for r in range(rows)]
    row_ms = (time.perf_counter() - t0) * 1000 / rows
    bitmask = np.full((rows, (vocab + 31) // 32), -1, dtype=np.int32)
    rng = random.Random(seed)
    spent, row_tokens = 0.0, 0
    live = list(range(rows))
    for _ in range(steps):
        if not live:
            break
        batch = [matchers[r] for r in live]
        view = np.ascontiguousarray(bitmask[: len(live)])
        t0 = time.perf_counter()
        lib.fill(batch, view)
        spent += time.perf_counter() - t0
        picks = []
        for i in range(len(live)):
            ids = allowed_ids(view[i], vocab)
            picks.append(int(rng.choice(ids.tolist())) if len(ids) else -1)
        t0 = time.perf_counter()
        still = []
        for r, m, tok in zip(live, batch, picks, strict=True):
            if tok >= 0 and lib.advance(m, tok) and not lib.done(m):
                still.append(r)
        spent += time.perf_counter() - t0
        row_tokens += len(live)
        live = still
    return {
        "setup_ms": round(setup_ms, 1),
        "compile_ms": round(statistics.median(compile_ms), 2),
        "compile_ms_max": round(max(compile_ms), 2),
        "row_ms": round(row_ms, 3),
        "mask_us": round(spent / max(row_tokens, 1) * 1e6, 1),
        "row_tokens": row_tokens,
        "refused": lib.refusal(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="the tiny model's 1,024-token vocabulary")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from bench.fixtures import bench_home, bench_profile_yaml
    from worker.core.profiles import load_profile

    with tempfile.TemporaryDirectory() as tmp:
        profile = load_profile(bench_profile_yaml(Path(tmp), tiny=args.tiny, home=bench_home()))
    assert profile.base is not None
    tokenizer = AutoTokenizer.from_pretrained(profile.base)
    vocab = int(json.loads((Path(profile.base) / "config.json").read_text())["vocab_size"])
    results: dict[str, Any] = {}
    for name, make in LIBS.items():
        torch_on_import = imports_torch(MODULES[name])
        if torch_on_import is None:
            results[name] = {"installed": False}
            continue
        results[name] = {"installed": True, "imports_torch": torch_on_import}
        results[name].update(measure(make(), tokenizer, vocab, args.rows, args.steps, args.seed))
    rows = [["library", "setup ms", "compile ms", "row ms", "mask µs/row/token", "imports torch", "refused"]]
    for name, r in results.items():
        if not r["installed"]:
            rows.append([name, "not installed", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                str(r["setup_ms"]),
                f"{r['compile_ms']} (max {r['compile_ms_max']})",
                str(r["row_ms"]),
                str(r["mask_us"]),
                str(r["imports_torch"]),
                r["refused"][:60],
            ]
        )
    table(f"grammar libraries, vocabulary {vocab}, {args.rows} rows", rows)
    report = {"machine": machine(), "vocab": vocab, "rows": args.rows, "libraries": results}
    if args.json:
        emit(report)
    return report


if __name__ == "__main__":
    main()
