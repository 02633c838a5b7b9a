"""Where a scrub is in its round: the cursor, its counts, when a saved
cursor can be trusted, and the runs of rows it can skip because they were
found pruned before (see scrub.py for why rounds, and what the races are).

The cursor is kept as the record "scrub_cursor" of the state database. A
saved cursor is resumed only if it still points at the start of a line of
the same index (same device and inode, long enough, a "\\n" just before the
offset); otherwise the round restarts at the top (scrub_round_restarted).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from . import index, retention, syscalls
from .log import Logger
from .rows import Row
from .state import PrunedRun, Records

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
    again); and the walk stops reading at one only if it starts a line (an
    index rewritten in place keeps its inode). Pruned rows right after a run
    counted, or right after a run a stopped scrub saved, make that run
    longer. Runs shorter than MIN_ROWS are not worth a row of the database.

    Memory. A scrub walks the index forward, so the known runs are read from
    the database PAGE at a time, in index order, as the walk reaches them;
    of those behind it only the last one is kept (a pruned row right after
    it extends it). What changed is handed to the caller at every save. So
    memory is a page and a save's worth of changes, however many runs there
    are: with pruned rows interleaved with kept ones, 100M rows can make
    1M runs (a whole list of them was hundreds of MB)."""

    MIN_ROWS = 64
    PAGE = 1024

    def __init__(self, records: Records, fd: int, st: os.stat_result, offset: int) -> None:
        self.records = records
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.size = st.st_size
        self._ahead: collections.deque[PrunedRun] = collections.deque()  # known, from the database
        self._loaded = offset - 1  # the last start read from the database
        self._all_loaded = False
        self._behind = records.pruned_run_before(*self.identity, offset)  # the last known run passed
        self.open: PrunedRun | None = None  # the run being found, ending at the line just looked at
        self._stored: PrunedRun | None = None  # the open run as saved (or to be saved), if it is
        self.changed: dict[int, PrunedRun] = {}  # to save
        self.forgotten: set[int] = set()  # to delete
        self._others_forgotten = False  # runs of another index: deleted at the first save

    def _first_from(self, offset: int) -> PrunedRun | None:
        """The first known run starting at `offset` or later (runs starting
        before it were stepped over: the walk is past them)."""
        while True:
            while self._ahead and self._ahead[0].start < offset:
                self._ahead.popleft()
            if self._ahead or self._all_loaded:
                return self._ahead[0] if self._ahead else None
            page = self.records.pruned_runs(*self.identity, max(self._loaded, offset - 1), self.PAGE)
            self._all_loaded = len(page) < self.PAGE
            if page:
                self._loaded = page[-1].start
            self._ahead.extend(page)

    def at(self, offset: int, cutoff: float | None) -> PrunedRun | None:
        """The known run that starts at `offset`, if it may still be counted;
        it becomes the run being found, so pruned rows after it extend it."""
        run = self._first_from(offset)
        if run is None or run.start != offset:
            return None
        self._ahead.popleft()
        if not self._usable(run, cutoff):
            return None
        self.close()
        self.open = self._stored = self._behind = run
        return run

    def _usable(self, run: PrunedRun, cutoff: float | None) -> bool:
        """Still this index's bytes and still all pruned; else forgotten."""
        usable = (
            run.end <= self.size
            and retention.older(run.newest, cutoff)
            and index.tail_digest(self.fd, run.end) == run.tail_sha256
        )
        if not usable:
            self._forget(run)
        return usable

    def _forget(self, run: PrunedRun) -> None:
        self.changed.pop(run.start, None)
        self.forgotten.add(run.start)
        if self._behind is not None and self._behind.start == run.start:
            self._behind = None

    def next_start(self, offset: int) -> int | None:
        """Where the next known run after `offset` starts: the walk reads
        lines up to there. Only at the start of a line: a run found before
        the index was rewritten in place (same inode) may start inside a line
        now, where that line would look torn and end the round (forgotten)."""
        while (run := self._first_from(offset + 1)) is not None:
            if run.start >= self.size or syscalls.pread_exact(self.fd, 1, run.start - 1) == b"\n":
                return run.start
            self._ahead.popleft()
            self._forget(run)
        return None

    def pruned(self, row: Row, received: int, cutoff: float | None) -> None:
        """`row` was found pruned: it extends the run being found (or a known
        one that ends where it starts), or starts one."""
        run = self.open
        if run is None or run.end != row.offset:
            self.close()
            run = self._stored = self._ending_at(row.offset, cutoff)
            run = run or PrunedRun(row.offset, row.offset, 0, 0, received, *self.identity, b"")
        self.open = run._replace(
            end=row.end, lines=run.lines + 1, rows=run.rows + 1, newest=max(run.newest, received)
        )

    def close(self) -> None:
        """The run being found ends (a line that is not a pruned row, a stop)."""
        run, stored = self.open, self._stored
        self.open = self._stored = None
        if run is None or run.rows < self.MIN_ROWS or run == stored:
            return
        run = run._replace(tail_sha256=index.tail_digest(self.fd, run.end))
        self.changed[run.start] = self._behind = run
        self.forgotten.discard(run.start)

    def _ending_at(self, offset: int, cutoff: float | None) -> PrunedRun | None:
        """The known, usable run that ends where a new one would start."""
        run = self._behind
        return run if run is not None and run.end == offset and self._usable(run, cutoff) else None

    def take_changes(self) -> tuple[list[PrunedRun], list[int], tuple[int, int] | None]:
        """What to save, which to forget, and (the first time) the index
        whose runs alone are kept, since the last time asked. The run being
        found is saved as far as it got, and goes on growing."""
        if self.open is not None:
            run, stored = self.open, self._stored
            self.close()
            saved = self.changed.get(run.start, stored if run == stored else None)
            self.open, self._stored = saved or run, saved
        saved_runs, forgotten = list(self.changed.values()), sorted(self.forgotten)
        self.changed, self.forgotten = {}, set()
        only = None if self._others_forgotten else self.identity
        self._others_forgotten = True
        return saved_runs, forgotten, only
