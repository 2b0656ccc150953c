#!/usr/bin/env bash
# Creates .venv and installs genq with its test tools.  Idempotent: a second run is quick.
# torch is installed first and pinned, so resolving the project never pulls a newer torch (and
# several GB of CUDA packages) on top.  Which build you get is your index's: on a CPU-only box,
# point it at a CPU wheel index (GENQ_TORCH_INDEX_URL=<index url>), or install the torch you
# want into .venv first — an importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "genq needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/pip install -q ${GENQ_TORCH_INDEX_URL:+--index-url "$GENQ_TORCH_INDEX_URL"} "torch==${GENQ_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/pip install -q -e '.[test]'
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
