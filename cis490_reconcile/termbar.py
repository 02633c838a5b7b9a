"""The terminal bar: progress on an interactive terminal, for an operator at a shell.

Only when stderr is a terminal: never in the journal (systemd connects
stderr to a socket, and JOURNAL_STREAM says so even under a pty-less
`systemd-run`), never when piped or redirected, never with TERM=dumb. It
redraws one line in place with a carriage return, at most every
REDRAW_INTERVAL_S, and clears it before a log line would land under it
(logs go to stdout, the bar to stderr; both end up on the same screen).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from typing import TextIO

from .basics import human_size
from .log import is_journal

REDRAW_INTERVAL_S = 0.2
_BAR_WIDTH = 24


def wanted(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    try:
        tty = stream.isatty()
    except ValueError:  # closed
        return False
    return tty and env.get("TERM", "") != "dumb" and not is_journal(stream, env)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(label: str, files: int, bytes_read: int, fraction: float | None, elapsed: float) -> str:
    """One line: label, bar and percent (when the total is known), files,
    bytes, rate, ETA."""
    rate = bytes_read / elapsed if elapsed > 0 else 0.0
    parts = [label]
    if fraction is not None:
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * _BAR_WIDTH)
        parts.append(f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {fraction * 100:5.1f}%")
    parts.append(f"{files} files  {human_size(bytes_read)}  {human_size(rate)}/s")
    if fraction and 0 < fraction < 1 and elapsed > 1:
        parts.append(f"ETA {_duration(elapsed * (1 - fraction) / fraction)}")
    return "  ".join(parts)


class TerminalBar:
    """Call update() as often as you like; it redraws when it is time.
    A terminal that hung up (EIO on every write) ends the bar, never the
    command: the SIGHUP that comes with it stops a pass cleanly."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0
        self._gone = False  # the terminal refused a write: draw no more

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self._gone = True

    def update(self, files: int, bytes_read: int, fraction: float | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if self._gone or (not force and now - self._drawn_at < REDRAW_INTERVAL_S):
            return
        self._drawn_at = now
        columns = shutil.get_terminal_size((100, 24)).columns - 1
        line = render(self.label, files, bytes_read, fraction, now - self._started)[:columns]
        self._write("\r" + line.ljust(self._width))
        self._width = 0 if self._gone else len(line)

    def clear(self) -> None:
        """Erase the bar (before a log line, or at the end)."""
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0
            self._drawn_at = 0.0


class _Clearing:
    """A log stream that erases the bar before each line, so log lines and
    the bar never share a line of the terminal."""

    def __init__(self, stream: TextIO, bar: TerminalBar) -> None:
        self._stream = stream
        self._bar = bar

    def write(self, text: str) -> int:
        self._bar.clear()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()


def clearing(stream: TextIO, bar: TerminalBar | None) -> TextIO:
    """`stream`, wrapped to clear `bar` before each write when there is one."""
    return stream if bar is None else _Clearing(stream, bar)  # type: ignore[return-value]
