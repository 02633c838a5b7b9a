"""Pacing a pass: a read-rate limit, and the checkpoint every slow step calls.

IOSchedulingClass=idle does nothing on disks without the bfq or mq-deadline
scheduler (most NVMe), so a pass that must not starve the receiver limits its
own reads. The limit is a token bucket that starts empty and holds at most one second
of credit: a pass that was idle (lock wait, listing) may burst for one
second, never more. While it sleeps it keeps calling the checkpoint, so the watchdog stays
fed and a stop request is seen within a fraction of a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_SLEEP_SLICE_S = 0.1


class ReadPacer:
    def __init__(self, rate: int | None, checkpoint: Callable[[], None]) -> None:
        self.rate = rate
        self._checkpoint = checkpoint
        self._credit = 0.0
        self._refilled = time.monotonic()
        self.slept_s = 0.0

    def consume(self, n: int) -> None:
        """Account for n bytes read; sleep until they fit the rate."""
        if self.rate is None:
            return
        now = time.monotonic()
        self._credit = min(self._credit + (now - self._refilled) * self.rate, float(self.rate))
        self._refilled = now
        self._credit -= n
        while self._credit < 0:
            nap = min(-self._credit / self.rate, MAX_SLEEP_SLICE_S)
            time.sleep(nap)
            self.slept_s += nap
            now = time.monotonic()
            self._credit += (now - self._refilled) * self.rate
            self._refilled = now
            self._checkpoint()
