"""structlog set-up: JSON lines when not on a terminal, readable console output on one.

Events carry ``job``, ``chunk`` and ``worker`` ids through ``structlog.contextvars``; any value that
looks like a URL with a password is redacted before it is written.  :func:`route_stdlib_logging`
sends the standard library's log records (Celery's, kombu's, Python warnings) through the same
processors, so a worker's log has one format.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.core.settings import Settings, get_settings, redact_url

_URL_WITH_PASSWORD = re.compile(r"\b(rediss?|amqps?|https?)://\S*@\S+")
_configured = False


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = _URL_WITH_PASSWORD.sub(lambda m: redact_url(m.group(0)), value)
    return event


def _renderer(settings: Settings) -> Any:
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


class _Expected(logging.Filter):
    """Drops the traceback Celery attaches to a task's deliberate ``Reject`` (genq hands a chunk
    back that way on SIGTERM or a lost store): the event says what happened; a traceback would
    read as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and record.exc_info[0].__name__ == "Reject":
            record.exc_info = None
            record.exc_text = None
        return True


def route_stdlib_logging(settings: Settings | None = None) -> None:
    """Render every stdlib log record (Celery, kombu, ``warnings``) as a genq event."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=_renderer(settings),
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _redact,
            ],
        )
    )
    handler.addFilter(_Expected())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(getattr(logging, settings.log_level))
    logging.captureWarnings(True)


def configure(settings: Settings | None = None, *, force: bool = False) -> None:
    """Configure structlog (and the stdlib root logger it renders through) once per process."""
    global _configured
    if _configured and not force:
        return
    settings = settings or get_settings()
    level = getattr(logging, settings.log_level)
    renderer = _renderer(settings)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # quiet libraries that print progress bars and advice on every load
    for noisy in ("transformers", "huggingface_hub", "accelerate", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    quiet_libraries()
    _configured = True


def quiet_libraries() -> None:
    """No progress bars or deprecation chatter from the model libraries in worker logs."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def get_logger(**bound: Any) -> Any:
    configure()
    return structlog.get_logger("genq").bind(**bound)


bind = structlog.contextvars.bind_contextvars
unbind = structlog.contextvars.unbind_contextvars
