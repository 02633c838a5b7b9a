"""Structured logs: one JSON object per line, flushed as it is written.

Every line starts with ts, level and event (a stable snake_case name); the
facts follow as fields. Lines are flushed one by one: a process killed by the
watchdog (SIGABRT) must not take buffered lines with it.

When stdout is the journal (systemd sets JOURNAL_STREAM to the device and
inode of the stream it connected), each line starts with the syslog priority
"<N>": journald strips it and stores it as PRIORITY, so
`journalctl -p warning` filters, and `journalctl -o cat` still prints pure JSON.

A log stream that fails (EPIPE: `cis490-reconcile --once | head`; EIO: the
terminal hung up; ENOSPC, EDQUOT, EFBIG: `> log` on a full disk) does not
fail the pass half done: its lines are dropped from then on (the stream is
pointed at /dev/null, so that even the interpreter's last flush succeeds)
and counted; the command ends with one line on stderr saying how many were
lost (say_lost). What the pass did is in the index, the state database and
the metrics.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from . import syscalls

Logger = FilteringBoundLogger
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _leading_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    head = {key: event_dict.pop(key) for key in ("ts", "level", "event") if key in event_dict}
    return {**head, **event_dict}


class _Render:
    def __init__(self, journal: bool) -> None:
        self._json = structlog.processors.JSONRenderer(default=str)
        self._journal = journal

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        line = str(self._json(logger, name, event_dict))
        if self._journal:
            return f"<{SYSLOG_PRIORITY.get(event_dict.get('level', ''), 6)}>{line}"
        return line


def is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Is `stream` the journal stream systemd connected (not a pipe a child
    inherited JOURNAL_STREAM through)?"""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


STREAM_FAILED = (errno.EPIPE, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_lost: dict[int, tuple[int, str]] = {}  # per failed fd: lines dropped, and why the stream failed


class _Output:
    """The stream log lines go to, until it fails (see above). Each line
    ends with a flush (PrintLogger), where a dropped one is counted."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._guard(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guard(self._stream.flush)
        if self._failed():
            lines, why = _lost[self._stream.fileno()]
            _lost[self._stream.fileno()] = lines + 1, why

    def _failed(self) -> bool:
        """Whether the stream failed, here or through another logger of the
        process (one made after a reload writes to the same fd)."""
        return bool(_lost) and self._stream.fileno() in _lost

    def _guard(self, call: Callable[..., object], *args: object) -> None:
        if self._failed():
            return
        try:
            call(*args)
        except OSError as e:
            if e.errno not in STREAM_FAILED:
                raise
            syscalls.discard_output(self._stream.fileno())
            _lost[self._stream.fileno()] = 0, e.strerror or str(e)


def say_lost(stderr: TextIO) -> None:
    """One line on stderr when log lines were dropped (nothing if stderr
    failed too: there is nowhere left to say it)."""
    for fd, (lines, why) in _lost.items():
        with contextlib.suppress(OSError):
            where = {1: "stdout", 2: "stderr"}.get(fd, f"fd {fd}")
            print(
                f"cis490-reconcile: {lines} log line(s) could not be written to {where}: {why}", file=stderr
            )
            stderr.flush()


def make_logger(level: str = "info", stream: TextIO | None = None, journal: bool | None = None) -> Logger:
    """journal=None: detect it from JOURNAL_STREAM."""
    stream = stream or sys.stdout
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
        _leading_keys,
        _Render(is_journal(stream) if journal is None else journal),
    ]
    logger: Logger = structlog.wrap_logger(
        structlog.PrintLogger(cast("TextIO", _Output(stream))),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    ).bind()  # the bound logger itself: through the lazy proxy even a filtered debug line costs 1.5 us
    return logger


MAX_EVENTS = 1000  # per kind and pass (or scrub run); the counts in the summary are always complete


class Events:
    """Per-item events, at most MAX_EVENTS of each kind, then one
    `events_suppressed`: a condition that can cover millions of files or
    rows (a pruned store, a garbage index) must not flood the journal."""

    def __init__(self, log: Logger, limit: int = MAX_EVENTS) -> None:
        self.log = log
        self.limit = limit
        self.counts: dict[str, int] = {}

    def warning(self, event: str, **fields: object) -> None:
        if self._count(event):
            self.log.warning(event, **fields)

    def info(self, event: str, **fields: object) -> None:
        if self._count(event):
            self.log.info(event, **fields)

    def _count(self, event: str) -> bool:
        """Whether this one is still to be logged."""
        n = self.counts[event] = self.counts.get(event, 0) + 1
        if n == self.limit + 1:
            self.log.warning("events_suppressed", suppressed_event=event, after=self.limit)
        return n <= self.limit
