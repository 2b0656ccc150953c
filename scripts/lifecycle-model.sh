#!/usr/bin/env bash
# The model-based test of a job's life (tests/test_lifecycle_model.py) on a long random walk:
# GENQ_MBT_STEPS steps (default 100,000) in examples of 50 steps, real Redis, a fresh seed each
# run, printed (GENQ_MBT_SEED runs one again; CI runs a short derandomized walk instead).  A
# failure prints the shrunk sequence of steps.
#   scripts/lifecycle-model.sh            # 100,000 steps
#   GENQ_MBT_STEPS=20000 scripts/lifecycle-model.sh
#   GENQ_MBT_SEED=1234 scripts/lifecycle-model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export GENQ_MBT_STEPS="${GENQ_MBT_STEPS:-100000}"
seed="${GENQ_MBT_SEED:-$(( (RANDOM << 15) | RANDOM ))}"
echo "lifecycle model: seed ${seed} (GENQ_MBT_SEED=${seed} runs this walk again)"
start=$(date +%s)
set +e
.venv/bin/python -m pytest tests/test_lifecycle_model.py::test_lifecycle_model -q -p no:cacheprovider \
  -o timeout=0 -s --hypothesis-seed="${seed}" "$@" 2>&1 | grep -v '^{"'
status=${PIPESTATUS[0]}
set -e
echo "lifecycle model: ${GENQ_MBT_STEPS} steps asked, seed ${seed}, $(( $(date +%s) - start )) s"
exit "$status"
