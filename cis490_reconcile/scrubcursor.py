"""Where a scrub is in its round: the cursor, its counts, and when a saved
cursor can be trusted (see scrub.py for why rounds, and what the races are).

The cursor is kept as the record "scrub_cursor" of the state database. A
saved cursor is resumed only if it still points at the start of a line of
the same index (same device and inode, long enough, a "\\n" just before the
offset); otherwise the round restarts at the top (scrub_round_restarted).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from . import syscalls
from .log import Logger

RESULTS = ("ok", "mismatched", "missing", "pruned", "unsettled", "unreadable")  # "checked" counts them all


@dataclass
class Counts:
    checked: int = 0  # rows whose tarball was looked at: the sum of RESULTS
    ok: int = 0
    mismatched: int = 0
    missing: int = 0
    pruned: int = 0  # gone, and received before the retention: by design
    unsettled: int = 0
    unreadable: int = 0
    unverifiable: int = 0  # rows that name no checkable file or digest
    bad_lines: int = 0  # lines that are not rows
    bytes_read: int = 0


@dataclass
class Cursor:
    index_dev: int = 0
    index_ino: int = 0
    offset: int = 0  # of the next row to check
    line: int = 0  # lines before offset
    round: int = 1
    round_started_at: float | None = None  # unix seconds
    last_round_completed_at: float | None = None
    counts: Counts = field(default_factory=Counts)

    def next_round(self) -> Cursor:
        return Cursor(
            self.index_dev,
            self.index_ino,
            round=self.round + 1,
            last_round_completed_at=self.last_round_completed_at,
        )

    @classmethod
    def load(cls, record: Mapping[str, object]) -> Cursor:
        """From its record; ValueError when it is not one."""
        try:
            cursor = cls(**{**record, "counts": Counts(**record["counts"])})  # type: ignore[arg-type]
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed: {e}") from None
        counters = [cursor.index_dev, cursor.index_ino, cursor.offset, cursor.line, cursor.round]
        counters += asdict(cursor.counts).values()
        times = [cursor.round_started_at, cursor.last_round_completed_at]
        if not all(type(n) is int and n >= 0 for n in counters) or not all(
            t is None or type(t) in (int, float) for t in times
        ):
            raise ValueError("malformed: a value is not a number >= 0")
        return cursor


def resume(cursor: Cursor, fd: int, st: os.stat_result, now: float, log: Logger) -> Cursor:
    """The cursor to continue from: the saved one if it still points at a
    line start of this same index, else a new round at offset 0."""
    identity = (st.st_dev, st.st_ino)
    if cursor.offset > 0:
        reason = None
        if (cursor.index_dev, cursor.index_ino) != identity:
            reason = "the index was replaced"
        elif st.st_size < cursor.offset:
            reason = "the index is shorter than the cursor"
        elif syscalls.pread_exact(fd, 1, cursor.offset - 1) != b"\n":
            reason = "the cursor is not at the start of a line"
        if reason is not None:
            log.warning(
                "scrub_round_restarted",
                reason=reason,
                previous_round=cursor.round,
                previous_offset=cursor.offset,
                previous_line=cursor.line,
            )
            cursor = cursor.next_round()
    cursor.index_dev, cursor.index_ino = identity
    if cursor.round_started_at is None:
        cursor.round_started_at = now
    return cursor
