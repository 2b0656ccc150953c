#!/usr/bin/env bash
# The GPU checks of docs/BENCHMARKS.md, as one script for a lent GPU machine: sized for its
# 15-minute device budget (start-up included) and 10 minutes a command, every step under its own
# time limit, so the figures of the steps that finished come back even when a later one runs out.
#
# Here (with network access to the package index), once:
#   bash scripts/gpu-check.sh --prepare    # shared/gpu/make-carry.sh plus pytest's wheels, into .gpu/
# There (the device tool, carrying .gpu; no network), first thing, before anything else uses it:
#   bash scripts/gpu-check.sh              # all steps, figures into $OUT (else ./gpu-results)
#   bash scripts/gpu-check.sh bench        # only the named steps (install always runs)
# Here, without CUDA (what can run of it does):
#   bash scripts/gpu-check.sh --dry-run    # the install into a scratch folder, the versions, pytest -m gpu
#                                          # (which skips without CUDA), bench.gpu on the tiny model in NF4
#                                          # (bitsandbytes' CPU backend)
#
# Steps (limit in seconds), each writing $OUT/<step>.txt; $OUT/summary.txt has each step's exit
# status and seconds, $OUT/bench-gpu.json the benchmark's figures:
#   install   (60)   .gpu's wheels and the trimmed bitsandbytes into /tmp/site
#   versions  (60)   nvidia-smi; torch, CUDA, bitsandbytes versions
#   tests    (150)   pytest -m gpu: NF4 on the GPU, NF4 with a small max_memory so layers offload to
#                    the CPU (greedy equal to HF generate), KV where each layer runs, a real CUDA OOM
#   bench    (300)   python -m bench.gpu --json --batches 1,64: Qwen2.5-7B-shaped random weights in NF4
#                    (built on the machine, ~15 GB bf16): batch-64 tok/s, weights' memory, vs padded
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  carry=""
  for c in shared/gpu/make-carry.sh ../shared/gpu/make-carry.sh ../../shared/gpu/make-carry.sh; do
    [ -f "$c" ] && carry=$(realpath "$c") && break
  done
  [ -n "$carry" ] || { echo "make-carry.sh not found (shared/gpu/)" >&2; exit 2; }
  # make-carry.sh writes .gpu/ at the top of a git checkout (and its .git/info/exclude, which a
  # worktree does not have as a folder): build it in a scratch repository, then move it here
  scratch=$(mktemp -d)
  git -C "$scratch" init -q
  (cd "$scratch" && bash "$carry")
  rm -rf .gpu && mv "$scratch/.gpu" .gpu && rm -rf "$scratch"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/wheels pytest iniconfig pluggy pytest-timeout
  du -sh .gpu
  exit 0
fi

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
steps=${*:-versions tests bench}
out=${OUT:-gpu-results}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
site=/tmp/site
scale=1  # the limits are the GPU's; the dry run's NF4 runs on bitsandbytes' (slow) CPU backend
[ "$dry" = 1 ] && site=$(mktemp -d) && scale=4

step() {  # step NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds into $out/NAME.txt
  local name=$1 limit=$(( $2 * scale )) start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" bash -c '"$@"' _ "$@" > "$out/$name.txt" 2>&1
  rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - start )) s (limit $limit)" | tee -a "$summary"
  return $rc
}

install() {
  [ -d .gpu/wheels ] || { echo "no .gpu/: run 'bash scripts/gpu-check.sh --prepare' here first, then carry .gpu"; return 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --target "$site" .gpu/wheels/*.whl \
    && cp -r .gpu/site/* "$site"/ && ls "$site" | wc -l
}

versions() {
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" -c 'import torch, bitsandbytes; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "bnb", bitsandbytes.__version__)'
}

export PY=python3 site
export -f install versions
if [ "$dry" = 1 ]; then
  # the project's own environment stands in for the GPU image's Python; the carry goes to a scratch
  # folder (so its install is checked) but is not put on the path
  step install 60 install || exit 2
  export PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD GENQ_HOME=${GENQ_HOME:-$PWD/.genq/bench} HF_HUB_OFFLINE=1
  bench_args=(--tiny --batches 1,4 --new-tokens 8 --naive-items 2)
else
  step install 60 install || exit 2
  export PYTHONPATH=$site:$PWD GENQ_HOME=${GENQ_HOME:-/tmp/genq-home} HF_HUB_OFFLINE=1
  bench_args=(--batches 1,64 --naive-items 2)
fi

failed=0
for s in $steps; do
  case $s in
    versions) step versions 60 versions || failed=1 ;;
    tests) step pytest-gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py || failed=1 ;;
    bench)
      step bench-gpu 300 "$PY" -m bench.gpu --json "${bench_args[@]}" || failed=1
      tail -n 1 "$out/bench-gpu.txt" | grep '^{' > "$out/bench-gpu.json" || failed=1
      ;;
    *) echo "unknown step: $s" | tee -a "$summary"; failed=1 ;;
  esac
done
cat "$summary"
exit $failed
