"""Log configuration, done once at process start.

JSON lines when stdout is not a terminal (journald, pipes), a readable console
rendering on a terminal. The format and level can be forced by flag or by the
FL_ORCHESTRATOR_LOG_FORMAT / FL_ORCHESTRATOR_LOG_LEVEL environment variables.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from fl_orchestrator.storage.jsonl import json_text

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "json", "console")
ENV_FORMAT = "FL_ORCHESTRATOR_LOG_FORMAT"
ENV_LEVEL = "FL_ORCHESTRATOR_LOG_LEVEL"


class LoggingSetupError(ValueError):
    """A log level or format that does not exist."""


def resolve_logging(
    flag_level: str | None, flag_format: str | None, config_level: str = "info", config_format: str = "auto"
) -> tuple[str, str]:
    """Flag beats environment beats config."""
    level = flag_level or os.environ.get(ENV_LEVEL) or config_level
    fmt = flag_format or os.environ.get(ENV_FORMAT) or config_format
    if level.lower() not in LEVELS:
        raise LoggingSetupError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    if fmt.lower() not in FORMATS:
        raise LoggingSetupError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return level.lower(), fmt.lower()


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process."""
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        # Strict JSON: a NaN or inf in an event (a metric, a norm) must not make the line unparsable.
        renderer = structlog.processors.JSONRenderer(serializer=json_text, sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
