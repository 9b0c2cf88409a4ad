"""Log configuration, done once at process start.

JSON lines when stdout is not a terminal (journald, pipes), a readable console
rendering on a terminal. The format and level can be forced by flag or by the
FL_ORCHESTRATOR_LOG_FORMAT / FL_ORCHESTRATOR_LOG_LEVEL environment variables.

``--log-file PATH`` appends every event as a JSON line to PATH as well, and the
console keeps its own format: the operator reads short lines while the file
keeps every field (``fl-orchestratord ... | tee`` would have made the console
JSON too, since a pipe is not a terminal). On the console, long lists and big
mappings are cut to their size: a round over 1,000 datasites is one line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

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


# On the console, a list longer than this, or a mapping with more keys, is shown by its size.
CONSOLE_MAX_ITEMS = 6
# The console's fields for the busiest events (the JSON keeps all of them); the run id, in every
# line, is left to the JSON too.
CONSOLE_FIELDS = {
    "round.completed": (
        "round",
        "sent",
        "succeeded",
        "failed",
        "timed_out",
        "collect_seconds",
        "evaluate_metrics",
        "train_metrics",
    ),
    "round.dispatched": ("round", "attempt", "phase", "selected", "deadline_in_seconds"),
    "result.accepted": ("round", "datasite", "num_examples", "train_seconds", "metrics"),
}
_CONSOLE_ALWAYS = ("event", "level", "timestamp", "job")


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, log_file: Path | None = None
) -> None:
    """Configure structlog for the whole process (OSError if ``log_file`` cannot be opened)."""
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    # Strict JSON: a NaN or inf in an event (a metric, a norm) must not make the line unparsable.
    as_json = structlog.processors.JSONRenderer(serializer=json_text, sort_keys=False)
    console = _Brief(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    renderer: structlog.typing.Processor = as_json if fmt == "json" else console
    if log_file is not None:
        renderer = _Tee(as_json, renderer, open(log_file, "a", encoding="utf-8", buffering=1))  # noqa: SIM115
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


class _Brief:
    """The console renderer, with long lists and big mappings shown by their size."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, logger: Any, name: str, event: Any) -> Any:
        fields = CONSOLE_FIELDS.get(event.get("event", ""))
        kept = (
            {k: v for k, v in event.items() if k in fields or k in _CONSOLE_ALWAYS}
            if fields
            else {k: v for k, v in event.items() if k != "run"}
        )
        return self.inner(logger, name, {key: _brief(value) for key, value in kept.items()})


def _brief(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset) and len(value) > CONSOLE_MAX_ITEMS:
        return f"[{len(value)} items]"
    if isinstance(value, dict) and len(value) > CONSOLE_MAX_ITEMS:
        return f"{{{len(value)} keys}}"
    return value


class _Tee:
    """Every event as a JSON line to the log file, and as the console renders it to stdout."""

    def __init__(self, as_json: Any, console: Any, file: TextIO) -> None:
        self.as_json = as_json
        self.console = console
        self.file = file

    def __call__(self, logger: Any, name: str, event: Any) -> Any:
        self.file.write(self.as_json(logger, name, dict(event)) + "\n")
        return self.console(logger, name, event)
