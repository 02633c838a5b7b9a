"""What every command shares at run time: signals and the stop they ask for,
and the exit codes.

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
import os
import select
import signal
from types import FrameType


class ExitCode(enum.IntEnum):
    OK = 0  # done (a pass that reported corrupt files did its job), or stopped by a signal
    FAILED = 1  # could not complete (lock timeout, disk full...), or found what needs attention
    USAGE = 2  # a bad flag, value or path: one line on stderr
    UNDECIDED = 3  # check: nothing damaged, but a file could not be decided (unverifiable, unreadable)


class StopRequested(BaseException):
    """Raised at a checkpoint after a stop was asked for. A BaseException so
    that no `except Exception` on the way swallows it."""


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
