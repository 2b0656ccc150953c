"""The benchmarks run end to end (on the tiny model: a smoke run, not a figure), and the parts their
figures rest on compute what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import drain, engine, fixtures, fleet, flops, gpu, grammars, prefix, queue, scaling, structured
from tests.helpers import REPO, env_for


def test_queue_benchmark_smoke() -> None:
    result = queue.main(["--tiny", "--items", "24", "--new-tokens", "4", "--chunk-size", "8"])
    assert result["chunks"] == 3 and result["queue_seconds"] > 0 and result["engine_seconds"] > 0
    assert result["chunk_overhead_ms_median"] is not None and result["chunk_overhead_ms_median"] >= 0
    assert result["status_tok_s"] > 0 and (result["progress_tok_s"] or 0) > 0


def test_drain_benchmark_smoke() -> None:
    """A real `genq collect --follow` process against a real redis-server: both outputs complete,
    ordered, once and identical; drained Redis below the plain one (the figures: bench/, docs)."""
    result = drain.main(["--items", "4000", "--rate", "400"])
    assert result["output_ok"] and result["outputs_identical"]
    assert 0 < result["redis_peak_mb_follow"] < result["redis_peak_mb_plain"]
    assert result["collector_peak_rss_mb"] > 0 and result["follow_seconds"] > 0


def test_scaling_benchmark_smoke() -> None:
    result = scaling.main(["--tiny", "--items", "16", "--new-tokens", "4", "--chunk-size", "2"])
    assert result["scaling"] > 0
    assert sum(result["items_per_worker"].values()) == 16


def test_fleet_benchmark_smoke() -> None:
    """Both workers, the cgroup made and removed (or a skip that says why)."""
    args = ["--tiny", "--items", "16", "--new-tokens", "4", "--chunk-size", "4", "--quota", "0.5"]
    result = fleet.main(args)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["slow_in_cgroup"] and result["makespan_fleet"] > 0 and result["makespan_fast_alone"] > 0
    assert sum(result["items_per_worker"].values()) == 16 and result["wasted_tokens"] >= 0
    assert not (fleet.CGROUP_CPU / f"genq-bench-slow-{os.getpid()}").exists()


def test_engine_benchmark_smoke() -> None:
    result = engine.main(
        ["--tiny", "--items", "12", "--new-tokens", "6", "--naive-items", "3", "--padded", "4,8",
         "--padded-plain", "8", "--skip-generate-batch", "--mixed-mean", "6", "--hf-pass",
         "--padded-prefill"]
    )  # fmt: skip
    # EOS is ignored, so every prompt generates exactly --new-tokens
    assert result["engine_tokens"] == 12 * 6
    assert all(v == 1.0 for v in result["useful_fraction"].values())  # equal lengths: nothing wasted
    # mixed lengths: every run keeps each item's own length; the engine computes no row-step more
    lengths = fixtures.answer_lengths(12, 6)
    assert result["mixed_tokens"] == sum(lengths) and len(set(lengths)) > 1
    assert set(result["mixed_tokens_kept"].values()) == {sum(lengths)}
    useful = result["useful_fraction_mixed"]
    assert useful["engine"] == 1.0
    # a padded batch of 8 runs until its longest row: its row-steps are 8 × that row's length
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(_tiny_base()))
    prompts = fixtures.mixed_prompts(Path(), 12, 6)
    by_prompt = sorted(zip(prompts, lengths, strict=True), key=lambda p: len(tok(p[0].prompt)["input_ids"]))
    steps8 = sum(len(g) * max(n for _, n in g) for g in (by_prompt[:8], by_prompt[8:]))
    assert useful["padded8"] == round(sum(lengths) / steps8, 3) < 1
    assert result["vs_padded_mixed"] == pytest.approx(
        result["mixed_tok_s"]["engine"]
        / max(v for k, v in result["mixed_tok_s"].items() if not k.startswith("engine")),
        rel=0.02,
    )
    assert result["naive_tok_s"] > 0 and result["engine_tok_s"] > 0
    assert set(result["padded_tok_s"]) == {"4", "8"} and all(v > 0 for v in result["padded_tok_s"].values())
    assert set(result["padded_plain_tok_s"]) == {"8"}
    best = max([*result["padded_tok_s"].values(), *result["padded_plain_tok_s"].values()])
    assert result["vs_padded"] == pytest.approx(result["engine_tok_s"] / best, rel=0.02)
    peak = result["kernel_peak_gflops"]
    assert peak["best"] == max(peak["matmul"], peak["packed"]) > 0
    assert 0 <= result["roofline_fraction"] < 1 and result["needed_gflop"] > 0  # 3 decimals: 0 under load
    assert result["generate_batch"] == "skipped"
    # the engine through transformers' pass, beside its own: the same tokens, its own figures
    assert result["own_pass"] is True and result["engine_hf_pass_tok_s"] > 0
    assert result["own_pass_gain"] == pytest.approx(
        result["engine_tok_s"] / result["engine_hf_pass_tok_s"], rel=0.02
    )
    assert result["mixed_tokens_kept"]["engine_hf_pass"] == sum(lengths)
    assert result["vs_padded_mixed_hf_pass"] > 0
    # and with its prefill left-padded instead of packed: the same tokens, its own figures
    assert result["engine_padded_prefill_tok_s"] > 0 and result["vs_padded_mixed_padded_prefill"] > 0
    assert result["packed_prefill_gain"] == pytest.approx(
        result["engine_tok_s"] / result["engine_padded_prefill_tok_s"], rel=0.02
    )
    assert result["mixed_tokens_kept"]["engine_padded_prefill"] == sum(lengths)
    assert result["naive_all_seconds"] == [result["naive_seconds"]]  # --repeat 1: one naive run
    split = result["engine_split_seconds"]
    assert set(split) == {"prefill", "decode"} and 0 < sum(split.values()) <= result["engine_seconds"]


def test_engine_benchmark_figures_agree_with_a_clock_outside_it() -> None:
    """bench.engine in its own process (the tiny model), each line of its output time-stamped here
    as it arrives, so its figures are checked against a clock outside the code under test:

    * the naive run's seconds: from the warm-up's ``naive 1/1`` line to the last ``naive 4/4``;
    * the engine's seconds: from its ``engine:`` line to the warm-up's line, less the warm-up
      (4 tokens of one prompt: at most twice 4 naive tokens' time);
    * tokens by construction: EOS is ignored, so each prompt generates exactly ``--new-tokens``;
    * the speedup must lie between the ratios those bounds allow (not merely equal the ratio of
      the benchmark's own rates, which is how it is computed)."""
    items, new, naive_items = 32, 8, 4
    args = ["--tiny", "--json", "--items", str(items), "--new-tokens", str(new)]
    args += ["--naive-items", str(naive_items), "--skip-generate-batch", "--padded", "", "--padded-plain", ""]
    args += ["--repeat", "1", "--mixed-mean", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "bench.engine", *args],
        cwd=REPO,
        env=env_for(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    assert proc.wait(300) == 0, "\n".join(text for _, text in lines[-30:])
    result = json.loads(lines[-1][1])

    engine_started = next(
        t for t, text in lines if text.startswith(("[bench] engine:", "[bench] round 1: engine"))
    )
    naive = [(t, text) for t, text in lines if text.startswith("[bench] naive ")]
    assert [text for _, text in naive] == ["[bench] naive 1/1"] + [
        f"[bench] naive {n}/{naive_items}" for n in range(1, naive_items + 1)
    ]
    warm_done, naive_done = naive[0][0], naive[-1][0]
    outside_naive = naive_done - warm_done
    per_token = outside_naive / (naive_items * new)
    outside_engine_max = warm_done - engine_started
    outside_engine_min = outside_engine_max - 2 * 4 * per_token

    def slack(seconds: float) -> float:
        return 0.05 + 0.05 * seconds

    assert result["engine_tokens"] == items * new
    assert abs(result["naive_seconds"] - outside_naive) <= slack(outside_naive)
    assert outside_engine_min - slack(outside_engine_max) <= result["engine_seconds"]
    assert result["engine_seconds"] <= outside_engine_max + slack(outside_engine_max)
    naive_rate = (naive_items * new) / outside_naive
    fastest = items * new / max(outside_engine_min - slack(outside_engine_max), 1e-3)
    slowest = items * new / (outside_engine_max + slack(outside_engine_max))
    low = slowest / (naive_items * new / max(outside_naive - slack(outside_naive), 1e-3))
    high = fastest / (naive_items * new / (outside_naive + slack(outside_naive)))
    assert low <= result["speedup"] <= high, (low, result["speedup"], high, naive_rate)
    assert result["roofline_fraction"] >= 0 and result["matmul_peak_gflops"] > 0
    assert result["generate_batch"] == "skipped"


def test_prefix_benchmark_smoke() -> None:
    result = prefix.main(
        ["--tiny", "--items", "12", "--system-tokens", "80", "--question-tokens", "8", "--new-tokens", "5"]
    )
    assert result["identical"] and result["items_differing"] == 0
    assert result["shared_prefix_tokens"] >= 80 and result["prefixes_computed"] == 1
    assert result["reuse_tok_s"] > 0 and result["no_reuse_tok_s"] > 0


def test_structured_benchmark_smoke() -> None:
    result = structured.main(["--tiny", "--items", "8", "--new-tokens", "6", "--batch", "4"])
    # every row generates exactly --new-tokens: the schemas cannot be completed that soon
    assert result["plain_tok_s"] > 0 and result["one_schema_tok_s"] > 0 and result["per_row_tok_s"] > 0
    assert result["schemas_compiled"] == 1 + 1 + 4  # warm-up, the shared one, one per row
    assert 0 < result["one_schema_constraint_share"] < 1 and 0 < result["per_row_constraint_share"] < 1
    expected = 1 - result["one_schema_tok_s"] / result["plain_tok_s"]
    assert result["one_schema_overhead"] == pytest.approx(expected, abs=1e-3)


def test_grammar_libraries_smoke() -> None:
    """llguidance (a genq dependency) is always measured; the others when installed."""
    result = grammars.main(["--tiny", "--rows", "4", "--steps", "4"])
    llg = result["libraries"]["llguidance"]
    assert llg["installed"] and llg["imports_torch"] is False
    assert llg["mask_us"] > 0 and llg["compile_ms"] > 0 and "look-around" in llg["refused"]


def _tiny_base() -> Path:
    from worker.model.tiny import TINY, ensure_model

    return ensure_model(TINY, home=fixtures.bench_home()).base


def test_answer_lengths_are_long_tailed_and_seeded() -> None:
    """The mixed workload's lengths: the same for every run, mean and spread as asked (log-normal,
    standard deviation ≈ mean), a long right tail (mean above median), cut at 8 × the mean."""
    import statistics

    lengths = fixtures.answer_lengths(4000, 32)
    assert lengths == fixtures.answer_lengths(4000, 32) != fixtures.answer_lengths(4000, 32, seed=1)
    mean = statistics.mean(lengths)
    assert 30 <= mean <= 34 and 0.85 <= statistics.pstdev(lengths) / mean <= 1.1
    assert statistics.median(lengths) < 0.8 * mean and min(lengths) >= 1 and max(lengths) <= 256
    items = fixtures.with_lengths(fixtures.mixed_prompts(Path(), 3, 64), [5, 1, 9])
    assert [it.params.max_new_tokens for it in items] == [5, 1, 9]


def test_needed_flops_by_hand() -> None:
    shape = flops.Shape(params=10, layers=2, heads=3, head_dim=4, hidden=5, vocab=7)
    # 3 prompt tokens + 2 generated: 4 tokens fed, attending 1 + 2 + 3 + 4 keys
    assert flops.needed_flops(shape, [(3, 2)]) == 2 * 10 * 4 + 4 * 2 * 3 * 4 * 10 + 2 * 5 * 7 * 2
    assert flops.needed_flops(shape, [(3, 2), (3, 2)]) == 2 * flops.needed_flops(shape, [(3, 2)])


def test_needed_flops_agree_with_torch_flop_counter(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    """The linear and vocabulary terms against torch's own count of the matrix products of one real
    forward pass over the p + g - 1 tokens fed, logits for the last g positions (attention, which
    the counter leaves out on the CPU or counts as full squares, replaced by its causal half)."""
    from torch.utils.flop_counter import FlopCounterMode

    from worker.model.loading import load_model

    model = load_model(tiny_profile, "fp32").model  # a model of its own: no packed weights
    shape = flops.Shape.of(model)
    p, g = 9, 4
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(1, p + g).unsqueeze(0), logits_to_keep=g)
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for k, v in counts.items() if "attention" in str(k))  # none counted on the CPU
    fed = p + g - 1
    causal = 4 * shape.layers * shape.heads * shape.head_dim * fed * (fed + 1) / 2
    assert flops.needed_flops(shape, [(p, g)]) == pytest.approx(
        counter.get_total_flops() - attention + causal
    )


def test_gpu_benchmark_smoke() -> None:
    """bench.gpu on the tiny model in nf4 (bitsandbytes' CPU backend here): the same steps a GPU
    run takes, so the script a lent GPU runs is known to work before the device time is spent."""
    result = gpu.main(["--tiny", "--batches", "1,4", "--new-tokens", "5", "--naive-items", "2"])
    assert result["mode"] == "nf4" and result["quantized_linear_layers"] == 14
    assert set(result["engine"]) == {"1", "4"}
    assert [r["tokens"] for r in result["engine"].values()] == [5, 20]  # EOS ignored
    assert result["naive_tok_s"] > 0 and result["weights_bytes"] > 0
    assert result["speedup_at_largest_batch"] == result["engine"]["4"]["x_naive"]
    if not torch.cuda.is_available():
        assert result["engine"]["4"]["peak_gpu_bytes"] is None


def test_seven_b_shape_matches_qwen25_7b() -> None:
    """The GPU benchmark's model has Qwen2.5-7B-Instruct's shapes: 7.6B parameters."""
    from worker.model.tiny import QWEN25_7B_SHAPE as s

    head = s.hidden_size // s.num_attention_heads
    layer = (
        s.hidden_size * (s.num_attention_heads + 2 * s.num_key_value_heads) * head  # q, k, v
        + (s.num_attention_heads + 2 * s.num_key_value_heads) * head  # their biases
        + s.num_attention_heads * head * s.hidden_size  # o
        + 3 * s.hidden_size * s.intermediate_size  # gate, up, down
        + 2 * s.hidden_size  # norms
    )
    total = s.num_hidden_layers * layer + 2 * s.vocab_size * s.hidden_size + s.hidden_size
    assert total == 7_615_616_512  # Qwen2.5-7B-Instruct's parameter count
    assert s.dtype == "bfloat16" and not s.tie_word_embeddings


def test_bf16_model_is_built_in_bf16_and_loads_in_nf4(tmp_path: Path) -> None:
    """What bench.gpu does to the 7B shape, on the tiny one: weights saved in bf16 (half the disk
    and RAM), a model vocabulary larger than its tokenizer's, loaded through the NF4 path."""
    from safetensors import safe_open

    from worker.core.profiles import load_profile
    from worker.model.loading import load_model
    from worker.model.tiny import TINY, ensure_model

    spec = replace(TINY, dtype="bfloat16", vocab_size=40_000)
    built = ensure_model(spec, home=tmp_path)
    with safe_open(str(next(built.base.glob("*.safetensors"))), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("up_proj.weight"))  # noqa: SIM118 - not a dict
        assert f.get_tensor(name).dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").shape[0] == 40_000
    assert len(json.loads((built.base / "tokenizer.json").read_text())["model"]["vocab"]) <= 32_000
    (tmp_path / "p.yaml").write_text(f"base: {built.base}\nadapter: {built.adapter}\n")
    loaded = load_model(load_profile(tmp_path / "p.yaml"), "nf4")
    assert loaded.quantized_linear_layers == 14 and loaded.adapter == "unmerged"


def test_non_embedding_parameters_skip_embeddings_and_tied_head() -> None:
    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(100, 8)
    model.layer = torch.nn.Linear(8, 8)
    model.lm_head = torch.nn.Linear(8, 100, bias=False)
    model.lm_head.weight = model.embed_tokens.weight
    assert engine.non_embedding_parameters(model) == 8 * 8 + 8


def test_spread_takes_prompts_across_the_length_range() -> None:
    from types import SimpleNamespace

    items = [SimpleNamespace(prompt="x" * n) for n in range(1, 101)]
    picked = engine.spread(items, 4)
    assert [len(p.prompt) for p in picked] == [13, 38, 63, 88]
    assert engine.spread(items[:3], 5) == items[:3]


def test_plain_linears_switches_the_packed_layers_back_for_a_while() -> None:
    from bench.hf import plain_linears
    from worker.engine import PackedLinear, pack_linear_weights

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    if not pack_linear_weights(model):
        pytest.skip("this torch build has no oneDNN linear packing")
    with plain_linears(model) as switched:
        assert switched == 2 and all(type(m) is torch.nn.Linear for m in model)
    assert all(isinstance(m, PackedLinear) for m in model)


def test_step_profile_smoke() -> None:
    from bench import step_profile

    result = step_profile.main(
        ["--tiny", "--rows", "4", "--context", "16", "--steps", "2", "--spread", "0.5",
         "--attention", "span,chunks,rows", "--fused", "on,off", "--own", "on,off"]
    )  # fmt: skip
    assert result["step_ms"] > 0 and sum(result["shares"].values()) == pytest.approx(1, abs=0.01)
    assert result["shares"]["linear"] > 0 and result["shares"]["attention"] > 0
    assert set(result["attention"]) == {
        f"{a}{f}{o}" for a in ("span", "chunks", "rows") for f in ("", "/unfused") for o in ("", "/hf")
    }
    assert all(v["step_ms"] > 0 for v in result["attention"].values())
    assert step_profile.row_lengths(4, 16, 0.5) == [24, 19, 13, 8]  # longest first, mean 16
    assert result["live_fraction"] == round(64 / 96, 3)
