#!/usr/bin/env bash
# The GPU checks of docs/BENCHMARKS.md, as one script for a lent GPU machine.
#
# Here (with network access to the package index), once:
#   bash scripts/gpu-check.sh --prepare   # ../shared/gpu/make-carry.sh, plus pytest's wheels, into .gpu/
# There (the device tool, carrying .gpu; no network):
#   bash scripts/gpu-check.sh             # installs .gpu, runs `pytest -m gpu` and `python -m bench.gpu`
#
# Results go to $OUT (the device tool's folder) or ./gpu-results: nvidia-smi.txt, pytest-gpu.txt,
# bench-gpu.txt (its last line is the JSON figures).  The 7B-shaped model is built on the machine
# (about 15 GB in bf16 under GENQ_HOME, a few minutes on 16 cores), so allow ~10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  bash ../shared/gpu/make-carry.sh
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels pytest iniconfig pluggy pytest-timeout
  du -sh .gpu
  exit 0
fi

out=${OUT:-gpu-results}
mkdir -p "$out"
[ -d .gpu/wheels ] || { echo "no .gpu/: run 'bash scripts/gpu-check.sh --prepare' here first, then carry .gpu" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl \
  && cp -r .gpu/site/* /tmp/site/ || exit 2
export PYTHONPATH=/tmp/site:$PWD
export GENQ_HOME=${GENQ_HOME:-/tmp/genq-home} HF_HUB_OFFLINE=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c 'import torch, bitsandbytes; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "bnb", bitsandbytes.__version__)' \
  2>&1 | tee "$out/versions.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"
tests=${PIPESTATUS[0]}
python3 -m bench.gpu --json "$@" 2>&1 | tee "$out/bench-gpu.txt"
bench=${PIPESTATUS[0]}
echo "pytest -m gpu: exit $tests; bench.gpu: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
