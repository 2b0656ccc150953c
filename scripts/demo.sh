#!/usr/bin/env bash
# The main job, embedded (no Redis): 40 medical prompts through the tiny random model with its
# LoRA adapter, written to results.jsonl in input order.  Run it twice: the second run resumes
# and finds nothing left to do.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset GENQ_BROKER_URL
.venv/bin/genq run examples/prompts.jsonl -o results.jsonl --profile tiny-random
echo "first rows of results.jsonl:"
head -n 3 results.jsonl
