"""Where a scrub is in its round: the cursor, its counts, when a saved
cursor can be trusted, and the runs of rows it can skip because they were
found pruned before (see scrub.py for why rounds, and what the races are).

The cursor is kept as the record "scrub_cursor" of the state database. A
saved cursor is resumed only if it still points at the start of a line of
the same index (same device and inode, long enough, a "\\n" just before the
offset); otherwise the round restarts at the top (scrub_round_restarted).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from . import index, retention, syscalls
from .log import Logger
from .rows import Row
from .state import PrunedRun

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


class PrunedRuns:
    """The runs of index lines a scrub found all pruned (state.PrunedRun):
    known ones to count without reading, and the one being found now.

    A run is used only while it still describes the index: the same device
    and inode, the same 4 KiB before its end, its newest row still older
    than the cutoff (an operator who raises `retention` gets its rows read
    again). Pruned rows right after a run counted, or right after a run a
    stopped scrub saved, make that run longer. Runs shorter than MIN_ROWS
    are not worth a row of the database."""

    MIN_ROWS = 64

    def __init__(self, known: list[PrunedRun], fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.size = st.st_size
        self.known = {r.start: r for r in known if (r.index_dev, r.index_ino) == self.identity}
        self.starts = sorted(self.known)
        self.forgotten: set[int] = {r.start for r in known} - set(self.known)  # of another index
        self.open: PrunedRun | None = None  # the run being found, ending at the line just looked at
        self.changed: dict[int, PrunedRun] = {}  # to save

    def at(self, offset: int, cutoff: float | None) -> PrunedRun | None:
        """The known run that starts at `offset`, if it may still be counted;
        it becomes the run being found, so pruned rows after it extend it."""
        run = self.known.get(offset)
        if run is None or not self._usable(run, cutoff):
            return None
        self.close()
        self.open = run
        return run

    def _usable(self, run: PrunedRun, cutoff: float | None) -> bool:
        """Still this index's bytes and still all pruned; else forgotten."""
        usable = (
            run.end <= self.size
            and retention.older(run.newest, cutoff)
            and index.tail_digest(self.fd, run.end) == run.tail_sha256
        )
        if not usable:
            self._forget(run.start)
        return usable

    def next_start(self, offset: int) -> int | None:
        """Where the next known run after `offset` starts."""
        i = bisect.bisect_right(self.starts, offset)
        return self.starts[i] if i < len(self.starts) else None

    def pruned(self, row: Row, received: int, cutoff: float | None) -> None:
        """`row` was found pruned: it extends the run being found (or a known
        one that ends where it starts), or starts one."""
        run = self.open
        if run is None or run.end != row.offset:
            self.close()
            run = self._ending_at(row.offset, cutoff)
            run = run or PrunedRun(row.offset, row.offset, 0, 0, received, *self.identity, b"")
        self.open = run._replace(
            end=row.end, lines=run.lines + 1, rows=run.rows + 1, newest=max(run.newest, received)
        )

    def close(self) -> None:
        """The run being found ends (a line that is not a pruned row, a stop)."""
        run, self.open = self.open, None
        if run is None or run.rows < self.MIN_ROWS or self.known.get(run.start) == run:
            return
        run = run._replace(tail_sha256=index.tail_digest(self.fd, run.end))
        if run.start not in self.known:
            bisect.insort(self.starts, run.start)
        self.changed[run.start] = self.known[run.start] = run
        self.forgotten.discard(run.start)

    def _ending_at(self, offset: int, cutoff: float | None) -> PrunedRun | None:
        """The known, usable run that ends where a new one would start."""
        i = bisect.bisect_left(self.starts, offset) - 1
        run = self.known[self.starts[i]] if i >= 0 else None
        return run if run is not None and run.end == offset and self._usable(run, cutoff) else None

    def _forget(self, start: int) -> None:
        del self.known[start]
        self.starts.remove(start)
        self.changed.pop(start, None)
        self.forgotten.add(start)

    def take_changes(self) -> tuple[list[PrunedRun], list[int]]:
        """What to save, and which to forget, since the last time asked (the
        run being found is saved as far as it got)."""
        if self.open is not None:
            run = self.open
            self.close()
            self.open = self.known.get(run.start, run)  # go on growing it
        saved, forgotten = list(self.changed.values()), sorted(self.forgotten)
        self.changed, self.forgotten = {}, set()
        return saved, forgotten
