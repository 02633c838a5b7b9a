"""Reading a file's bytes once: hashed, paced, and out of the page cache.

Verifying a tarball and scrubbing one both read every byte exactly once, in
1 MiB reads, hashing as they go; this is that loop. What was read is
dropped from the page cache (POSIX_FADV_DONTNEED) every DROP_EVERY bytes: we
will not read it again, and the receiver's working set should stay cached.

Pacing. IOSchedulingClass=idle does nothing on disks without the bfq or
mq-deadline scheduler (most NVMe), so a pass that must not starve the
receiver limits its own reads: ReadPacer is a token bucket that starts empty
and holds at most one second of credit, so a reader that was idle (lock wait,
listing) may burst for one second, never more. While it sleeps it keeps
calling its checkpoint, so the watchdog stays fed and a stop request is seen
within a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from . import syscalls

READ_SIZE = 1 << 20
DROP_EVERY = 8 << 20
MAX_SLEEP_SLICE_S = 0.1


class HashingReader:
    """The first `limit` bytes of an open file (the size a scan saw: a file
    that keeps growing cannot keep a reader busy), as a file-like object a
    decoder can read from. Each chunk goes to sha256, then to on_chunk (the
    zstd frame walker), then on_read(len) (pacing, progress, a stop).
    `head`, the file's first bytes when the caller has already read them,
    is served before anything is read again: a tarball smaller than a read
    costs one pread."""

    def __init__(
        self,
        fd: int,
        limit: int,
        on_chunk: Callable[[bytes], None] | None = None,
        on_read: Callable[[int], None] | None = None,
        head: bytes = b"",
    ) -> None:
        self._fd = fd
        self._limit = limit
        self._on_chunk = on_chunk
        self._on_read = on_read
        self._head = head[:limit]
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._dropped = 0

    def read(self, size: int = -1) -> bytes:
        size = min(size if 0 < size <= READ_SIZE else READ_SIZE, self._limit - self.size)
        if size <= 0:
            return b""
        if self.size < len(self._head):
            data = self._head[self.size : self.size + size]
        else:
            data = os.pread(self._fd, size, self.size)
        if data:
            self.sha256.update(data)
            if self._on_chunk is not None:
                self._on_chunk(data)
            self.size += len(data)
            if self.size - self._dropped >= DROP_EVERY or self.size == self._limit:
                syscalls.drop_cache(self._fd, self._dropped, self.size - self._dropped)
                self._dropped = self.size
            if self._on_read is not None:
                self._on_read(len(data))
        return data

    def drain(self) -> None:
        """Read to the limit (or the end of the file, if it shrank)."""
        while self.read(READ_SIZE):
            pass


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
