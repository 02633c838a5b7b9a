"""Reading a file's bytes once: hashed, paced, and out of the page cache.

Verifying a tarball and scrubbing one both read every byte exactly once, in
1 MiB reads, hashing as they go; this is that loop.

The page cache. We will not read these bytes again, and the receiver's
working set should stay cached, so what a read brings in from the disk is
dropped (POSIX_FADV_DONTNEED) every DROP_EVERY bytes. What was cached
before we read it is not ours to drop: a tarball received minutes ago is
often still cached, and whoever reads new episodes next (the receiver, an
uploader) would find it gone. Each read first asks for bytes the cache
already holds (syscalls.pread_cached); from the first read that must go to
the disk, everything read from there on is dropped. Where the filesystem
cannot tell (tmpfs, FUSE), every byte is dropped, as if read from the disk.
A file whose first bytes were cached and whose rest the kernel's readahead
brings in ahead of us may be left cached: at worst what a reader that never
drops leaves. Not dropping 9,600 cached 64 KiB tarballs made the pass
1.07 -> 1.04 s, 1.77 -> 1.68 s with one worker (tests/bench --only many).

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
from typing import NamedTuple

from . import syscalls

READ_SIZE = 1 << 20
DROP_EVERY = 8 << 20
MAX_SLEEP_SLICE_S = 0.1


class HashingReader:
    """The first `limit` bytes of an open file (the size a scan saw: a file
    that keeps growing cannot keep a reader busy), as a file-like object a
    decoder can read from. Each chunk goes to sha256, then to on_chunk (the
    zstd frame walker), then on_read(len) (pacing, progress, a stop).
    `head`, the file's first bytes when the caller has already read them
    (read_head), is served before anything is read again: a tarball smaller
    than a read costs one pread."""

    def __init__(
        self,
        fd: int,
        limit: int,
        on_chunk: Callable[[bytes | bytearray], None] | None = None,
        on_read: Callable[[int], None] | None = None,
        head: Head | None = None,
    ) -> None:
        self._fd = fd
        self._limit = limit
        self._on_chunk = on_chunk
        self._on_read = on_read
        self._head = b"" if head is None else head.data
        if len(self._head) > limit:
            self._head = self._head[:limit]
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._cached = head is None or head.cached  # every byte read so far was cached before
        self._kept = 0  # bytes below this are not to be dropped: cached before, or dropped already

    def read(self, size: int = -1) -> bytes | bytearray:
        size = min(size if 0 < size <= READ_SIZE else READ_SIZE, self._limit - self.size)
        if size <= 0:
            return b""
        data: bytes | bytearray
        if self.size < len(self._head):
            head = self._head  # all of it at once, usually: no copy
            data = head if not self.size and size >= len(head) else head[self.size : self.size + size]
        elif self._cached and (cached := syscalls.pread_cached(self._fd, size, self.size)) is not None:
            data = cached
        else:
            self._cached = False
            data = os.pread(self._fd, size, self.size)
        if data:
            self.sha256.update(data)
            if self._on_chunk is not None:
                self._on_chunk(data)
            self.size += len(data)
            if self._cached:
                self._kept = self.size
            elif self.size - self._kept >= DROP_EVERY or self.size == self._limit:
                syscalls.drop_cache(self._fd, self._kept, self.size - self._kept)
                self._kept = self.size
            if self._on_read is not None:
                self._on_read(len(data))
        return data

    def drain(self) -> None:
        """Read to the limit (or the end of the file, if it shrank)."""
        while self.read(READ_SIZE):
            pass


class Head(NamedTuple):
    """A file's first bytes, and whether the page cache held them before."""

    data: bytes | bytearray
    cached: bool


def read_head(fd: int, size: int) -> Head:
    """The first min(size, READ_SIZE) bytes of a file of `size` bytes, for a
    HashingReader to serve again."""
    n = min(size, READ_SIZE)
    data = syscalls.pread_cached(fd, n, 0)
    return Head(os.pread(fd, n, 0), False) if data is None else Head(data, True)


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
