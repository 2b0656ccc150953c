# genq worker image: one Dockerfile for the CPU and the GPU worker.
#
#   CPU:  docker build -f docker/worker.Dockerfile -t genq-worker:cpu .
#   GPU:  docker build -f docker/worker.Dockerfile -t genq-worker:gpu \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# compose.yaml builds both.  The entrypoint is `genq-worker`, so the command is its arguments:
#   docker run --rm genq-worker:cpu facts
#   docker run --rm --gpus all -e GENQ_BROKER_URL=redis://HOST:6379/0 -e HF_TOKEN \
#     -v hf-cache:/root/.cache/huggingface genq-worker:gpu start --profile qwen2.5-7b-medical --mode nf4
#
# Why python:3.11-slim works for the GPU too: the CUDA builds of torch (and bitsandbytes) ship the
# CUDA runtime libraries as wheels; the host provides only the NVIDIA driver, which the NVIDIA
# Container Toolkit mounts into the container.  A CUDA base image is not needed.

# Any image with Python >= 3.11 and pip on PATH (e.g. a pinned python:3.11-slim@sha256:...).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from: .../whl/cpu (CPU-only, ~200 MB) or a CUDA index such as .../whl/cu128
# (several GB).  TORCH_VERSION pins a version (e.g. 2.13.0); empty = the newest on that index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch first, from the chosen index, in its own layer (the largest one; rebuilt only when the
#    build args change).  `pip install .` below keeps it: it satisfies the project's torch>=2.4,
#    so pip never swaps in a different (multi-GB CUDA) build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch${TORCH_VERSION:+==${TORCH_VERSION}}"

# 2. the project itself (a regular install, not editable).  Only what the worker needs is copied;
#    .dockerignore keeps virtualenvs, caches, tests and secrets (.env) out of the build context.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY bench ./bench
COPY configs ./configs
RUN pip install . && python -c "import worker.main, producer.cli"

# 3. an unprivileged user, and the folders it writes to.
#    - HF_HOME is /root/.cache/huggingface, the path Hugging Face's own examples mount a cache on,
#      so `-v ~/.cache/huggingface:/root/.cache/huggingface` works as people expect.  /root is made
#      traversable (711: enter, not list) and only the cache folder inside it belongs to genq.
#      A bind-mounted host folder must be writable by uid 1000 (or run with `user:` set).
#    - GENQ_HOME holds genq's own files (the tiny test model); the offload folder is inside it.
#    - GENQ_CONFIGS_DIR: the package is installed into site-packages, so the default configs/
#      folder next to the source does not exist there; point at the copied profiles.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin genq \
    && mkdir -p /root/.cache/huggingface /var/lib/genq/offload \
    && chown -R genq:genq /root/.cache /var/lib/genq \
    && chmod 711 /root
ENV HF_HOME=/root/.cache/huggingface \
    GENQ_HOME=/var/lib/genq \
    GENQ_OFFLOAD_FOLDER=/var/lib/genq/offload \
    GENQ_CONFIGS_DIR=/app/configs \
    GENQ_LOG_FORMAT=json
USER genq

# The worker CLI: `start`, `check`, `prefetch`, `queues`, `facts`.  Exec form, so SIGTERM from
# `docker stop` reaches it (compose adds `init: true` to reap prefork children as well): it finishes
# the current micro-batch and hands the rest of its chunk back to the queue.
ENTRYPOINT ["genq-worker"]
CMD ["--help"]
