"""Structured logs: one JSON object per line, flushed as it is written.

Every line starts with ts, level and event (a stable snake_case name); the
facts follow as fields. Lines are flushed one by one: a process killed by the
watchdog must not take buffered lines with it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

Logger = FilteringBoundLogger


def _leading_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    head = {key: event_dict.pop(key) for key in ("ts", "level", "event") if key in event_dict}
    return {**head, **event_dict}


def make_logger(level: str = "info", stream: TextIO | None = None) -> Logger:
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
        _leading_keys,
        structlog.processors.JSONRenderer(default=str),
    ]
    logger: Logger = structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stdout),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    return logger
