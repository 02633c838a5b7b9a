"""What every command shares at run time: signals and the stop they ask for,
the exit codes, and how times and sizes are written.

Signals only set flags; the work notices them at its next checkpoint:

    SIGTERM, SIGINT   stop at the next checkpoint (a commit that holds the
                      index lock finishes first), then exit 0
    SIGHUP            in a loop: reload the config after the current pass;
                      otherwise a hangup of the terminal: stop, as above

An idle wait sleeps in select() on a pipe the kernel writes to on every
signal (signal.set_wakeup_fd), so a stop is seen at once, not after the wait.
"""

from __future__ import annotations

import enum
import operator
import os
import select
import signal
from datetime import datetime, timedelta, timezone
from types import FrameType
from typing import TypeVar

_T = TypeVar("_T")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CRASH_AT = os.environ.get("CIS490_TEST_CRASH_AT")


class ExitCode(enum.IntEnum):
    OK = 0  # done (a pass that reported corrupt files did its job), or stopped by a signal
    FAILED = 1  # could not complete (lock timeout, disk full...), or found what needs attention
    USAGE = 2  # a bad flag, value or path: one line on stderr
    UNDECIDED = 3  # check: nothing damaged, but a file could not be decided (unverifiable, unreadable)


class StopRequested(BaseException):
    """Raised at a checkpoint after a stop was asked for. A BaseException so
    that no `except Exception` on the way swallows it."""


def crash_point(name: str) -> None:
    """Die here, at once and uncleanly (SIGKILL), when the crash tests name
    this step in CIS490_TEST_CRASH_AT: they prove a kill at each named step
    leaves an index and a state database that the next pass makes whole.
    The steps: index_written (between write and fdatasync), appended (after
    the append, before the state database knows), in_transaction (inside a
    state transaction), forked (a rebuild's forked reader has started),
    rebuilding (halfway through a full rebuild, its halves merged)."""
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def pickled_by_position(cls: type[_T]) -> type[_T]:
    """Have a slots dataclass pickle as its class and its fields in order.
    The default (state set field by field, in Python) made pickling the
    tarballs and verdicts the workers exchange 7% of a pass's CPU on 64 KiB
    tarballs (re-measure: tests/bench/run.py --only many)."""
    names = vars(cls)["__slots__"]
    assert isinstance(names, tuple) and len(names) > 1
    fields = operator.attrgetter(*names)
    cls.__reduce__ = lambda self: (cls, fields(self))  # type: ignore[method-assign]
    return cls


def iso_utc(ns: int) -> str:
    """A timestamp the way the receiver writes received_at_wall:
    ``2026-11-25T08:23:02.659399+00:00``."""
    return (_EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Signals:
    """Flags set by signal handlers, and a wakeup pipe for idle waits."""

    def __init__(self, hangup_reloads: bool) -> None:
        self.stop_by: str | None = None
        self.reload = False
        self._hangup_reloads = hangup_reloads
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._saved: dict[int, object] = {}
        self._saved_wakeup = -1

    def __enter__(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._saved[sig] = signal.signal(sig, self._handle)
        self._saved_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *_: object) -> None:
        signal.set_wakeup_fd(self._saved_wakeup)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        os.close(self._r)
        os.close(self._w)

    def _handle(self, signum: int, _: FrameType | None) -> None:
        if signum == signal.SIGHUP and self._hangup_reloads:
            self.reload = True
        else:
            self.stop_by = signal.Signals(signum).name

    def should_stop(self) -> bool:
        return self.stop_by is not None

    def wait(self, timeout: float) -> None:
        """Sleep until `timeout` passes or a signal arrives."""
        select.select([self._r], [], [], max(timeout, 0.0))
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass
