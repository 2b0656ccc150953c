"""Silence what the model libraries print that means nothing to a genq user (called before any
of them is imported by a worker or an embedded run)."""

from __future__ import annotations

import logging
import os

SILENCED = {
    "bitsandbytes.backends.cpu.ops": (
        "at import, bitsandbytes tries to fetch CPU kernels from the Hugging Face hub through the "
        "optional `kernels` package and warns when it is absent; genq never downloads code at run "
        "time and bitsandbytes falls back to its own CPU kernels"
    ),
    "kernels._internals.hf_hub": (
        "offline (HF_HUB_OFFLINE), `kernels` logs 'Skipping publisher trust check' for the kernel "
        "bitsandbytes asks it for, at every start: it was checked when it entered the cache, and "
        "a worker never downloads code"
    ),
    "transformers.tokenization_utils_base": (
        "'Token indices sequence length is longer than the specified maximum': genq checks every "
        "prompt against the profile's context itself and records context_length_exceeded"
    ),
}
"""Loggers raised to ERROR, and why each one's warnings mean nothing here."""


def quiet_model_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in SILENCED:
        logging.getLogger(name).setLevel(logging.ERROR)
