"""index.jsonl: the row contract, a tolerant streaming reader, the append protocol.

The row format is the contract with the receiver and every downstream reader:
one JSON object per line, ``json.dumps(row, sort_keys=True)``, ASCII, "\\n".
The file is append-only. Nothing here ever truncates it, seeks back to write,
or rewrites a byte; see `append_rows` for the one way rows get in.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import lock, syscalls

SCHEMA_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # receiver rows are ~300 bytes; longer lines are garbage
_READ_CHUNK = 1 << 20
PROGRESS_LINES = 10_000
DEFAULT_LOCK_TIMEOUT_S = 30.0
_LOW64 = (1 << 64) - 1


class IndexWriteError(OSError):
    """An append did not complete; the index may end in a torn line that the
    next append (ours or the receiver's through `append_rows`) terminates."""


def encode_row(row: Mapping[str, object]) -> bytes:
    """One row as the receiver writes it: sorted keys, default separators, ASCII."""
    return (json.dumps(row, sort_keys=True) + "\n").encode("ascii")


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int  # 1-based
    offset: int  # byte offset of the line's first byte
    reason: str


def parse_line(raw: bytes | None) -> dict[str, object] | str | None:
    """A complete line of the index (as split_lines gives it) as a row: a
    JSON object with an episode_id string and a host_id string or none.
    None for a blank line (neither a row nor a bad line); otherwise the
    reason it is not a row."""
    if raw is None:
        return "line longer than 1 MiB"
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    episode_id = obj.get("episode_id")
    if not isinstance(episode_id, str) or not episode_id:
        return "no episode_id string"
    host_id = obj.get("host_id")
    if host_id is not None and not isinstance(host_id, str):
        return "host_id is not a string"
    return obj


def row_key(row: Mapping[str, object]) -> tuple[str | None, str]:
    """(host_id or None, episode_id) of a row parse_line accepted."""
    return row.get("host_id"), row["episode_id"]  # type: ignore[return-value]


def _digest(host_id: str, episode_id: str) -> int:
    """128 bits of BLAKE2b over an unambiguous encoding of the key: collisions
    are out of reach (about 1e-26 for a million rows), so a digest can stand
    for the key."""
    key = f"{len(host_id)}:{host_id}/{episode_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=16).digest())


class IndexedKeys:
    """The episodes the index covers, about 16 bytes per row.

    Keys are 128-bit digests: most live in two sorted arrays (high and low
    64 bits, searched with bisect in C), the newest in a small set that is
    merged in when it grows past an eighth of the arrays. A merge copies runs
    of the arrays between the new keys' positions (C slices), so its peak is
    the old arrays, the new ones and the small set: no Python int per row. A
    key added twice is stored once. A row without host_id is
    an old row and covers its episode_id on every host, as the legacy tool
    assumed; those are rare and kept as strings."""

    MERGE_MIN = 1 << 16
    MERGE_FRACTION = 8  # merge when the set holds more than 1/8 of the arrays

    def __init__(self) -> None:
        self._hi = array("Q")
        self._lo = array("Q")
        self._recent: set[int] = set()
        self.hostless: set[str] = set()

    def host_rows(self) -> int:
        """Distinct (host_id, episode_id) keys, host-less rows not counted."""
        self._merge()
        return len(self._hi)

    def add(self, host_id: str | None, episode_id: str) -> None:
        if host_id is None:
            self.hostless.add(episode_id)
            return
        self._recent.add(_digest(host_id, episode_id))
        if len(self._recent) > max(self.MERGE_MIN, len(self._hi) // self.MERGE_FRACTION):
            self._merge()

    def covers(self, host_id: str, episode_id: str) -> bool:
        return episode_id in self.hostless or self.has_row(host_id, episode_id)

    def has_row(self, host_id: str, episode_id: str) -> bool:
        """A row with exactly this host_id (not counting host-less rows)."""
        digest = _digest(host_id, episode_id)
        if digest in self._recent:
            return True
        hi, lo = digest >> 64, digest & _LOW64
        i = bisect.bisect_left(self._hi, hi)
        while i < len(self._hi) and self._hi[i] == hi:  # equal high halves: 1 in 2**64 per pair
            if self._lo[i] == lo:
                return True
            i += 1
        return False

    def _merge(self) -> None:
        if not self._recent:
            return
        old_hi, old_lo, n = self._hi, self._lo, len(self._hi)
        hi, lo = array("Q"), array("Q")
        start = 0
        for digest in sorted(self._recent):
            d_hi, d_lo = digest >> 64, digest & _LOW64
            i = bisect.bisect_left(old_hi, d_hi, start)
            while i < n and old_hi[i] == d_hi and old_lo[i] < d_lo:
                i += 1
            if i < n and old_hi[i] == d_hi and old_lo[i] == d_lo:
                continue  # added again: a key is stored once
            hi.extend(old_hi[start:i])
            lo.extend(old_lo[start:i])
            hi.append(d_hi)
            lo.append(d_lo)
            start = i
        hi.extend(old_hi[start:])
        lo.extend(old_lo[start:])
        self._hi, self._lo, self._recent = hi, lo, set()

    def to_bytes(self) -> tuple[bytes, bytes, list[str]]:
        """(high halves, low halves, host-less episode ids) for the state file."""
        self._merge()
        return self._hi.tobytes(), self._lo.tobytes(), sorted(self.hostless)

    @classmethod
    def from_bytes(cls, hi: bytes, lo: bytes, hostless: Iterable[str]) -> IndexedKeys:
        keys = cls()
        keys._hi.frombytes(hi)
        keys._lo.frombytes(lo)
        if len(keys._hi) != len(keys._lo):  # order is ours to trust: the state file is checksummed
            raise ValueError("key arrays differ in length")
        keys.hostless = set(hostless)
        return keys


def split_lines(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, next_offset, line) for the complete lines in bytes [start, end):
    line lacks its "\\n" and is None when longer than MAX_LINE_BYTES. A torn
    tail (bytes after the last "\\n") comes last with next_offset == -1.
    Memory: one chunk plus one capped line."""
    carry: list[bytes] = []
    carry_len = 0
    overlong = False
    line_start = start
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
        if not chunk:
            break  # the file shrank under us; the caller notices on the next stat
        i = 0
        while True:
            j = chunk.find(b"\n", i)
            piece = chunk[i:] if j < 0 else chunk[i:j]
            if not overlong:
                carry_len += len(piece)
                if carry_len > MAX_LINE_BYTES:
                    overlong, carry = True, []
                else:
                    carry.append(piece)
            if j < 0:
                break
            i = j + 1
            yield line_start, pos + i, None if overlong else b"".join(carry)
            carry, carry_len, overlong = [], 0, False
            line_start = pos + i
        pos += len(chunk)
    if line_start < pos:
        yield line_start, -1, None if overlong else b"".join(carry)


class IndexReader:
    """Follows index.jsonl as it grows: parses each complete line once, keeps
    the keys, and remembers where it stopped.

    A last line without "\\n" (a torn tail) is not consumed: it is parsed only to
    be conservative (a complete row that just lacks its newline still counts as
    indexed) and is read again next time, once terminated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys = IndexedKeys()
        self.offset = 0  # first byte not yet consumed
        self.lines = 0  # complete lines consumed
        self.bad_lines = 0
        self.torn_tail = False  # does the file end inside a line?
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file parsed

    def resume(
        self, keys: IndexedKeys, identity: tuple[int, int], offset: int, lines: int, bad_lines: int
    ) -> None:
        """Continue from a saved position (state.resume_reader checks it first)."""
        self.keys, self.identity = keys, identity
        self.offset, self.lines, self.bad_lines = offset, lines, bad_lines

    def catch_up(
        self,
        fd: int,
        on_bad_line: Callable[[BadLine], None],
        on_progress: Callable[[], None] | None = None,
    ) -> bool:
        """Parse what was appended since the last call. Returns True when the
        file was replaced or shrank and was therefore parsed from the start.
        on_progress is called every PROGRESS_LINES lines (a watchdog ping on a
        large index)."""
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        restarted = self.identity is not None and (identity != self.identity or st.st_size < self.offset)
        if restarted:
            self.keys = IndexedKeys()
            self.offset = self.lines = self.bad_lines = 0
        self.identity = identity
        self.torn_tail = False
        for offset, next_offset, raw in split_lines(fd, self.offset, st.st_size):
            row = parse_line(raw)
            if next_offset < 0:
                self.torn_tail = True
                if isinstance(row, dict):
                    self.keys.add(*row_key(row))
                break
            self.lines += 1
            self.offset = next_offset
            if on_progress is not None and self.lines % PROGRESS_LINES == 0:
                on_progress()
            if isinstance(row, str):
                self._bad(BadLine(self.lines, offset, row), on_bad_line)
            elif row is not None:
                self.keys.add(*row_key(row))
        return restarted

    def skip_own(self, fd: int, written: int, keys: Sequence[tuple[str, str]]) -> None:
        """Account for rows this process just appended under the lock, without
        parsing them again. Only when the reader was at the end of the file
        (no torn tail) and the file grew by exactly what we wrote: anything
        else is left for the next catch_up to parse."""
        if self.torn_tail or os.fstat(fd).st_size != self.offset + written:
            return
        self.offset += written
        self.lines += len(keys)
        for host_id, episode_id in keys:
            self.keys.add(host_id, episode_id)

    def _bad(self, bad: BadLine, on_bad_line: Callable[[BadLine], None]) -> None:
        self.bad_lines += 1
        on_bad_line(bad)


class LockedIndex:
    """The index open for appending while the lock is held."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def ends_torn(self) -> bool:
        size = os.fstat(self.fd).st_size
        return size > 0 and os.pread(self.fd, 1, size - 1) != b"\n"

    def append(self, lines: Sequence[bytes]) -> int:
        """Append whole lines in ONE write, terminating a torn tail first (in the
        same write), then fdatasync. Returns the bytes written. Never retries: a
        short write raises IndexWriteError and leaves a torn tail for the next
        append to terminate."""
        data = b"".join(lines)
        if self.ends_torn():
            data = b"\n" + data
        if not data:
            return 0
        written = os.write(self.fd, data)
        if written != len(data):
            raise IndexWriteError(f"short write: {written} of {len(data)} bytes")
        syscalls.fdatasync(self.fd)
        return written


@contextmanager
def locked(
    index: Path,
    lock_file: Path | None = None,
    timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[LockedIndex]:
    """Hold the shared lock and yield the index opened O_RDWR|O_APPEND.

    When the lock file is the index itself (the default), the same fd carries
    the locks and the writes."""
    append_flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
    if lock_file is None or os.path.realpath(lock_file) == os.path.realpath(index):
        with lock.hold(index, append_flags, timeout, on_wait) as fd:
            yield LockedIndex(fd)
        return
    with lock.hold(lock_file, os.O_RDWR | os.O_CREAT, timeout, on_wait):
        fd = os.open(index, append_flags | os.O_CLOEXEC, 0o644)
        try:
            yield LockedIndex(fd)
        finally:
            os.close(fd)


def append_rows(
    index: Path,
    rows: Iterable[Mapping[str, object]],
    *,
    lock_file: Path | None = None,
    timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> int:
    """The append protocol, importable by the receiver. Under the shared lock
    (OFD + flock on `lock_file`, default the index): terminate a torn last line,
    write all rows as whole lines in one write() on an O_APPEND fd, fdatasync,
    release. Returns the bytes written. Raises lock.LockTimeout,
    IndexWriteError or OSError (ENOSPC, EACCES, ...); bytes already in the
    index are never changed."""
    lines = [encode_row(row) for row in rows]
    with locked(index, lock_file, timeout) as ix:
        return ix.append(lines)
