"""Run by tests/test_engine_oom.py in a process of its own: the engine on the tiny model under an
address-space limit (``RLIMIT_AS``), so that a real allocation of its KV cache fails in torch's CPU
allocator ("DefaultCPUAllocator: can't allocate memory") once more than two rows run together.

    python -m tests.oom_child HOME     # prints one JSON line

Each row's slots hold ``CAPACITY`` positions (a large ``max_new_tokens``: the cache is allocated
for the whole budget up front), about 64 MiB per row; stop strings end every row after a few tokens,
so nothing but that allocation is large.  The limit is set after a warm-up, at the process's
address space plus room for three rows: 2 rows fit, 4 and 8 do not.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

CAPACITY = 131_072
ROWS_ROOM = 3
STOPS = ["e", "a", "o", "i", " ", "u", "s", "t", "r", "n", "l", "p", "d", "h", "m", "c"]
PROMPTS = [
    "the patient",
    "fever and cough",
    "what is the dose of aspirin",
    "blood pressure was high",
    "symptoms include fatigue",
    "explain the treatment",
    "chest pain",
    "shortness of breath",
]


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main(home: Path) -> dict[str, object]:
    import structlog
    import torch

    from worker.core.profiles import load_profile
    from worker.core.schema import GenParams, Item
    from worker.engine import Engine
    from worker.model.loading import load_model
    from worker.model.tiny import TINY, ensure_model

    built = ensure_model(TINY, home=home)
    yaml = home / "oom-child.yaml"
    yaml.write_text(
        f"name: oom-child\nbase: {built.base}\nadapter: {built.adapter}\n"
        f"limits:\n  max_new_tokens: {CAPACITY}\n  context_length: {2 * CAPACITY}\n"
        f"engine:\n  max_batch_size: 8\n  max_batch_tokens: {16 * CAPACITY}\n"
    )
    loaded = load_model(load_profile(yaml), "fp32")
    engine = Engine(loaded)
    params = GenParams(max_new_tokens=CAPACITY - 16, stop=STOPS)
    items = [Item(index=i, id=f"o{i}", prompt=p, params=params) for i, p in enumerate(PROMPTS)]
    engine.generate(items[:1])  # warm-up, one row of the same capacity, no limit yet
    cfg = loaded.model.config
    head = cfg.hidden_size // cfg.num_attention_heads
    per_row = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head * CAPACITY * 4
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + ROWS_ROOM * per_row
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        with structlog.testing.capture_logs() as events:
            results = engine.generate(items)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # outside the limit: the same items one by one, for the texts
    alone = [engine.generate([it])[0].text for it in items]
    return {
        "per_row_bytes": per_row,
        "backoff": [
            {"rows": e["rows"], "new_limit": e["new_limit"], "error": e["error"]}
            for e in events
            if e["event"] == "oom_backoff"
        ],
        "ceiling": engine.oom_ceiling,
        "status": [r.status for r in results],
        "completion_tokens": [r.usage.completion_tokens for r in results],
        "same_text_as_alone": [r.text for r in results] == alone,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))), flush=True)
