"""index.jsonl: the row contract, one reader for every line, the append protocol.

The row format is the contract with the receiver and every downstream reader:
one JSON object per line, ``json.dumps(row, sort_keys=True)``, ASCII, "\\n".
The file is append-only. Nothing here ever truncates it, seeks back to write,
or rewrites a byte; `LockedIndex.append` is the one way rows get in.

Reading. `chunks` is the only loop over index lines (a pass, status and
scrub all use it, most through `entries`). It yields a Row for each line
that is a row, a BadLine for each that is not (blank lines are neither), and
a TornTail for bytes after the last "\\n" (an append in progress, or one cut
short by a full disk); a chunk of lines that are all rows comes as one Rows,
which a reader of keys takes a chunk at a time (indexkeys.KeyOf.many).
What is a row is decided in rows.py, imported at the first line to decode.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from . import basics, lock, syscalls
from .store import Tarball
from .verdicts import Intact

if TYPE_CHECKING:
    from .rows import Row

SCHEMA_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # receiver rows are ~300 bytes; longer lines are garbage
READ_CHUNK = 1 << 20
TAIL_BYTES = 4096
JSON_SPACE = b" \t\n\r"  # a line of only these is blank; \x0b or \x0c make it a bad line, as for json
DEFAULT_LOCK_TIMEOUT_S = 30.0


class IndexWriteError(OSError):
    """An append did not complete; the index may end in a torn line that the
    next append (ours or the receiver's through `append_rows`) terminates."""


# json.dumps(row, sort_keys=True) builds this encoder on every call (0.9 of 4.1 us a row)
_ROW_ENCODER = json.JSONEncoder(sort_keys=True)


def encode_row(row: Mapping[str, object]) -> bytes:
    """One row as the receiver writes it: json.dumps(row, sort_keys=True),
    that is sorted keys, default separators, ASCII."""
    return (_ROW_ENCODER.encode(row) + "\n").encode("ascii")


def backfill_row(tarball: Tarball, intact: Intact, now_ns: int) -> dict[str, object]:
    """The receiver's row (received_at_wall is the tarball's mtime, the best
    estimate of when the receiver got it), marked backfilled, plus when."""
    row: dict[str, object] = {
        "received_at_wall": basics.iso_utc(tarball.mtime_ns),
        "host_id": tarball.host_id,
        "episode_id": tarball.episode_id,
        "sha256": intact.sha256,
        "size_bytes": intact.size,
        "schema_version": SCHEMA_VERSION,
        "backfilled": True,
        "backfilled_at": basics.iso_utc(now_ns),
    }
    if intact.commit:
        row["commit"] = intact.commit
    return row


class BadLine(NamedTuple):
    line: int  # 1-based
    offset: int  # byte offset of the line's first byte
    end: int
    reason: str


class TornTail(NamedTuple):
    """Bytes after the last "\\n". A complete row that only lacks its
    newline is kept in `row`: readers count it as indexed, to be safe."""

    line: int
    offset: int
    row: Row | None


class Rows(NamedTuple):
    """Consecutive lines that are all rows: row i is line first + i, from
    ends[i] to ends[i + 1]. Their own line, offset and end are left unset
    (`entries` sets them): setting them cost a tenth of a full pass."""

    rows: list[Row]
    first: int
    ends: list[int]


Entry: TypeAlias = "Row | BadLine | TornTail"


def entries(fd: int, start: int, end: int, line: int = 0) -> Iterator[Entry]:
    """Every line in bytes [start, end) of the index, in order, as Row,
    BadLine or TornTail (last). `line` is the number of lines before
    `start`. Memory: one chunk plus one capped line, whatever the file."""
    for got in chunks(fd, start, end, line):
        if not isinstance(got, Rows):
            yield got
            continue
        ends = got.ends
        for n, (row, offset, nxt) in enumerate(zip(got.rows, ends[:-1], ends[1:], strict=True), got.first):
            row.line, row.offset, row.end = n, offset, nxt
            yield row


def chunks(fd: int, start: int, end: int, line: int = 0) -> Iterator[Rows | Entry]:
    """`entries`, with each chunk of lines that are all rows as one Rows."""
    carry, carry_len = b"", 0  # the start of a line the previous chunk did not end
    overlong = False  # ... too long to keep: only its length is
    line_start = pos = start
    while pos < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - pos), pos)
        if not chunk:
            break  # the file shrank under us; the caller notices on the next stat
        pos += len(chunk)
        lines = chunk.split(b"\n")
        tail = lines.pop()  # after the last "\n" of the chunk: carried on
        if lines:
            first_len = carry_len + len(lines[0])
            rest = memoryview(chunk)[len(lines[0]) + 1 : len(chunk) - len(tail)]  # the lines after it
            lines[0] = b"" if overlong else carry + lines[0]
            lengths = itertools.chain([first_len], map(len, itertools.islice(lines, 1, None)))
            ends = list(itertools.accumulate((n + 1 for n in lengths), initial=line_start))
            yield from _judged(lines, rest, line + 1, ends, overlong or first_len > MAX_LINE_BYTES)
            line += len(lines)
            line_start = ends[-1]
            carry, carry_len, overlong = b"", 0, False
        carry_len += len(tail)
        if not overlong:
            carry += tail
            if carry_len > MAX_LINE_BYTES:
                carry, overlong = b"", True
    if line_start < pos:
        torn = None if overlong else _decoding().decode([carry])[0]
        if isinstance(torn, str):
            torn = None
        elif torn is not None:
            torn.line, torn.offset, torn.end = line + 1, line_start, pos
        yield TornTail(line + 1, line_start, torn)


class _Decoders(NamedTuple):
    decode: Callable[[Sequence[bytes]], list[Row | str]]
    all_rows: Callable[[Sequence[bytes], memoryview], list[Row] | None]


@functools.cache
def _decoding() -> _Decoders:
    """rows.py's decoders, imported at the first line there is to decode: a
    pass that finds nothing new to read need not load msgspec (rows.py)."""
    from . import rows

    return _Decoders(rows.decode, rows.all_rows)


def newlines(fd: int, start: int, end: int) -> int:
    """How many lines end in bytes [start, end) (blank lines are no entries,
    but they count in the line numbers of those after them)."""
    count = 0
    for pos in range(start, end, READ_CHUNK):
        count += os.pread(fd, min(READ_CHUNK, end - pos), pos).count(b"\n")
    return count


def _judged(
    lines: list[bytes], rest: memoryview, first: int, ends: list[int], first_overlong: bool
) -> Iterator[Rows | Row | BadLine]:
    """The complete lines of one chunk (`rest`: lines[1:] as read): line
    `first` starts at ends[0] and line first + i ends where line first + i + 1
    starts (ends[i + 1]). When every line is a row (nearly always) they are
    decoded at once, one Rows; anything else goes line by line. Only the
    first line can be overlong: the others fit in one read."""
    decoding = _decoding()
    if not first_overlong and (rows := decoding.all_rows(lines, rest)) is not None:
        yield Rows(rows, first, ends)
        return
    for i, raw in enumerate(lines):
        n, offset, nxt = first + i, ends[i], ends[i + 1]
        if (i == 0 and first_overlong) or len(raw) > MAX_LINE_BYTES:
            yield BadLine(n, offset, nxt, "line longer than 1 MiB")
        elif raw.strip(JSON_SPACE):
            got = decoding.decode([raw])[0]
            if isinstance(got, str):
                yield BadLine(n, offset, nxt, got)
            else:
                got.line, got.offset, got.end = n, offset, nxt
                yield got


def tail_digest(fd: int, offset: int) -> bytes:
    """sha256 of the TAIL_BYTES before `offset`: whether bytes read once are
    still there (a checkpoint, a scrub's pruned run), without reading them all."""
    start = max(0, offset - TAIL_BYTES)
    return hashlib.sha256(syscalls.pread_exact(fd, offset - start, start)).digest()


def open_for_reading(path: Path) -> int | None:
    """The index opened to read without the lock (it is append-only: an
    unlocked reader sees whole lines plus at most a torn tail); None when
    there is none yet. O_NONBLOCK: a FIFO put in its place never hangs us;
    it, or a device, is refused (OSError "not a regular file"), as scrub
    refuses it: rows appended there would vanish."""
    try:
        return syscalls.open_regular(path)[0]
    except FileNotFoundError:
        return None


def line_at(fd: int, offset: int) -> bytes:
    """The line that starts at `offset`, without its "\\n" (at most
    MAX_LINE_BYTES + 1 bytes: a longer one is no row anyway)."""
    data = os.pread(fd, 4096, offset)
    if b"\n" not in data:
        data = os.pread(fd, MAX_LINE_BYTES + 1, offset)
    return data.split(b"\n", 1)[0]


def row_at(fd: int, offset: int) -> Row | None:
    """The row on the line that starts at `offset` (to name a key the state
    database knows only by digest), or None if it is not one any more."""
    found = _decoding().decode([line_at(fd, offset)])[0]
    return None if isinstance(found, str) else found


# --- appending ------------------------------------------------------------------


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
        basics.step("index_written")
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
    rows: Sequence[Mapping[str, object]],
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
