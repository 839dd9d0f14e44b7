"""structlog for the daemon: console in the foreground, priority-prefixed logfmt for
journald, JSON on request.  Every line about a device carries domid, devid and vdev
(bound by the code that handles the device)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = ("debug", "info", "warning", "error", "critical")


class _PrefixedRenderer:
    """logfmt with the sd-daemon(3) priority prefix, so journald stores PRIORITY=."""

    def __init__(self) -> None:
        self._logfmt = structlog.processors.LogfmtRenderer(
            key_order=["event", "domid", "devid", "vdev"], drop_missing=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method))
        return f"<{_PRIORITY.get(level, 6)}>{self._logfmt(logger, method, event)}"


def default_format() -> str:
    if os.environ.get("JOURNAL_STREAM"):
        return "journal"
    return "console"


def configure(fmt: str = "console", level: str = "info") -> None:
    """(Re)configure logging; called at start-up and on SIGHUP with a new level."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    shared: list[Any] = [structlog.contextvars.merge_contextvars,
                         structlog.processors.add_log_level,
                         structlog.processors.StackInfoRenderer()]
    if fmt == "json":
        processors = [*shared, structlog.processors.TimeStamper("iso", utc=True),
                      structlog.processors.ExceptionRenderer(
                          structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
                      structlog.processors.JSONRenderer()]
    elif fmt == "journal":
        processors = [*shared, structlog.processors.format_exc_info, _PrefixedRenderer()]
    elif fmt == "console":
        processors = [*shared, structlog.processors.TimeStamper("%H:%M:%S.%f"),
                      structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    else:
        raise ValueError(f"log format {fmt!r} is not console, json or journal")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
