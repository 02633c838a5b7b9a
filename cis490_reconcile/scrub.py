"""Scrub: re-read indexed tarballs and check their bytes against their rows.

Order. The index is append-only and every row was verified when it was
written, so index order is verification order: walking the rows in index
order re-checks first what was checked longest ago. A scrub walks the index
in *rounds*, and keeps where it is in a cursor, the record "scrub_cursor" of
the state database (one file to back up or delete):

    the index's (st_dev, st_ino), the byte offset and line number of the next
    row, the round number and when it started, the round's counts so far,
    and when the last round completed

The cursor is saved every SAVE_INTERVAL_S or SAVE_EVERY_ROWS rows and on
exit, each time in one transaction, so a scrub stopped by --max-duration, a
signal or even SIGKILL resumes where it stopped (after a SIGKILL it re-checks
at most the last few seconds of rows). A stop inside a read leaves the cursor
at that row: it is read again next time, never skipped. When the cursor
reaches the end of the index the round is complete and the next run starts a
new round at offset 0.

Races, and why they are harmless:

- The receiver (or a reconcile pass) appends while we scrub: a run stops at
  the size it saw when it started; rows beyond are checked by the next run
  of the round or by the next round. A torn last line (an append in
  progress) is not a row yet: the round ends before it.
- The index is replaced (another inode), shortened below the cursor, or
  rewritten so that the cursor no longer follows a "\\n": the offset means
  nothing any more, so a new round starts at 0 (scrub_round_restarted).
- A tarball is replaced, grows or is removed while it is read: it is
  unsettled, not a mismatch (store.HostDir.moved). The next round looks again.
- Two scrubs at once would share the cursor: an exclusive flock on
  ``<state_dir>/scrub.lock`` keeps the second one out. A pass may run at the
  same time: its writes and the cursor's are short transactions.

Pruned rows. With `retention` set, a row received before it whose tarball is
gone is *pruned*: counted, no warning, no failure, found by one lstat (the
file is never opened). A newer one is *missing*. At most log.MAX_EVENTS
events of each kind are logged per round; the counts are always complete.

Scrub only reads the store and the index: it takes no index lock, never
writes the index and never "fixes" a row or a tarball. What it finds is
reported (warning events, metrics, exit status 1) for an operator to act on.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import NamedTuple

from . import basics, index, retention, scrubcursor, statedir, syscalls
from .basics import human_size
from .config import Config
from .log import Logger
from .notify import Notifier
from .reading import ReadPacer
from .rowcheck import check, checkable, report
from .rows import Row
from .runtime import StopRequested
from .scrubcursor import Counts, Cursor, PrunedRuns
from .state import State, StateUnusable
from .statedir import StateBusy
from .store import Store
from .termbar import TerminalBar

CURSOR = "scrub_cursor"
LOCK_FILE = "scrub.lock"
SAVE_INTERVAL_S = 2.0
SAVE_EVERY_ROWS = 10_000
REPORT_INTERVAL_S = 0.2  # STATUS= and the progress bar rate-limit themselves; this spares the formatting


class ScrubNotRun(Exception):
    """The scrub could not start (another scrub, a busy state directory, no
    index); the event that says why is logged."""


class ScrubStopped(ScrubNotRun):
    """Stopped (a signal, max_duration) before it started: while a pass held
    the state directory it had to settle. Said in scrub_stopped."""


class ScrubRun(NamedTuple):
    """What one run did: the scrub_finished facts and the round's."""

    started_at: float  # unix seconds
    duration_s: float
    run: Counts  # this run's
    round: int
    in_round: Counts  # the round's so far, across runs
    round_progress: float  # of the index, by bytes
    round_completed: bool
    last_round_completed_at: float | None
    stopped_by: str | None  # "signal", "max_duration"
    error: str | None  # what stopped it early

    @property
    def found_problems(self) -> bool:
        """A mismatched, missing or unreadable tarball."""
        return bool(self.run.mismatched or self.run.missing or self.run.unreadable)


class Scrubber:
    """One scrub run, from the saved cursor until the end of the index, a
    stop request or the deadline."""

    def __init__(
        self,
        cfg: Config,
        log: Logger,
        notifier: Notifier,
        should_stop: Callable[[], bool],
        max_duration: float | None,
        bar: TerminalBar | None,
    ) -> None:
        assert cfg.state_dir is not None  # cli checks it is a directory
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.log = log
        self.notifier = notifier
        self.should_stop = should_stop
        self.bar = bar
        self.started = time.monotonic()
        self.started_at = time.time()
        self.deadline = None if max_duration is None else self.started + max_duration
        self.cutoff = retention.cutoff(cfg.retention, self.started_at)
        self.pacer = ReadPacer(cfg.max_read_rate, self._checkpoint)
        self.run_counts = Counts()
        self.cursor = Cursor()
        self.runs: PrunedRuns  # once the index is open
        self.pruned_unread = 0  # rows of runs found pruned before: counted, not read
        self.index_size = 0
        self.stopped_by: str | None = None
        self.state: State | None = None
        self._saved_at = self.started
        self._rows_since_save = 0
        self._next_report = self.started

    # --- the run ------------------------------------------------------------------

    def run(self) -> ScrubRun:
        """One scrub run under the scrub lock. Raises ScrubNotRun when it
        could not start (said in one event); a run that got going returns
        what it did, an error that stopped it included."""
        lock_path = self.state_dir / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:  # a state directory this user may not write
            self.log.error("scrub_failed", lock_file=lock_path, error=f"lock file: {e.strerror}")
            raise ScrubNotRun(f"lock file: {e.strerror}") from e
        try:
            if not syscalls.try_flock(fd):
                self.log.error("scrub_already_running", lock_file=lock_path)
                raise ScrubNotRun(f"another scrub holds {lock_path}")
            try:
                self.state = statedir.guest(self.cfg, self.log, settle=True, on_wait=self._waiting)
            except StopRequested:
                self.log.info("scrub_stopped", stopped_by=self.stopped_by, state_dir=self.state_dir)
                raise ScrubStopped(f"stopped by {self.stopped_by}") from None
            except (
                StateBusy,
                StateUnusable,
                OSError,
                sqlite3.OperationalError,
            ) as e:  # busy, full, unwritable
                self.log.error("scrub_failed", error=str(e))
                raise ScrubNotRun(str(e)) from e
            try:
                return self._run()
            finally:
                self.state.close()
        finally:
            os.close(fd)

    def _run(self) -> ScrubRun:
        assert self.state is not None
        try:
            fd, st = syscalls.open_regular(self.cfg.index)
        except OSError as e:
            self.log.error("scrub_failed", index=self.cfg.index, error=f"index: {e.strerror}")
            raise ScrubNotRun(f"index: {e.strerror}") from e
        try:
            try:
                self.index_size = st.st_size
                self.cursor = scrubcursor.resume(self._saved_cursor(), fd, st, self.started_at, self.log)
                self.runs = PrunedRuns(self.state.records, fd, st, self.cursor.offset)
            except OSError as e:
                self.log.error("scrub_failed", index=self.cfg.index, error=f"index: {e.strerror}")
                raise ScrubNotRun(f"index: {e.strerror}") from e
            try:
                completed = self._scrub(fd)
            except OSError as e:  # the index or the store became unreadable: keep what we did
                self.log.error("scrub_failed", error=str(e), **self._summary())
                done = self._done(completed=False, error=str(e))
                self._save()
                return done
            return self._finish(completed)  # the index still open: the runs' saves read its bytes
        finally:
            os.close(fd)

    def _saved_cursor(self) -> Cursor:
        assert self.state is not None
        record = self.state.records.get(CURSOR)
        try:
            return Cursor() if record is None else Cursor.load(record)
        except ValueError as e:
            self.log.warning("scrub_cursor_ignored", reason=str(e))
            return Cursor()

    def _scrub(self, fd: int) -> bool:
        """Check rows from the cursor to the size the index had at the start.
        True when the round completed, False when stopped."""
        cursor = self.cursor
        self.log.info(
            "scrub_started",
            index=self.cfg.index,
            episodes_root=self.cfg.episodes_root,
            round=cursor.round,
            offset=cursor.offset,
            line=cursor.line,
            index_size=self.index_size,
            max_duration_s=None if self.deadline is None else round(self.deadline - self.started, 3),
            max_read_rate=self.cfg.max_read_rate,
        )
        self.notifier.ready(f"scrub round {cursor.round}")
        with Store(self.cfg.episodes_root) as store:
            try:
                while cursor.offset < self.index_size:
                    run = self.runs.at(cursor.offset, self.cutoff)
                    if run is not None:  # found pruned before: counted, not read
                        self.pruned_unread += run.rows
                        for counts in (self.run_counts, cursor.counts):
                            counts.checked += run.rows
                            counts.pruned += run.rows
                        cursor.offset, cursor.line = run.end, cursor.line + run.lines
                        self._counted(run.rows)
                        continue
                    stop = min(self.runs.next_start(cursor.offset) or self.index_size, self.index_size)
                    for entry in index.entries(fd, cursor.offset, stop, cursor.line):
                        if isinstance(entry, index.TornTail):  # an append in progress: not a row yet
                            self.log.debug("index_torn_tail", offset=entry.offset)
                            return True
                        basics.step("scrubbing")
                        self._line(store, entry)
                        cursor.offset, cursor.line = entry.end, entry.line
                        self._counted(1)
                    if stop == self.index_size:
                        break
                    cursor.line += index.newlines(fd, cursor.offset, stop)  # blank lines before the run
                    cursor.offset = stop
            except StopRequested:
                return False
        return True

    def _counted(self, rows: int) -> None:
        """After rows were counted: save the cursor now and then, feed the watchdog, heed a stop."""
        self._rows_since_save += rows
        if self._rows_since_save >= SAVE_EVERY_ROWS or time.monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self._save()
        self._checkpoint()

    def _line(self, store: Store, entry: Row | index.BadLine) -> None:
        """Check one line of the index and count what it came to."""
        round_counts = self.cursor.counts
        if isinstance(entry, index.BadLine):
            self.runs.close()
            self.log.debug("index_bad_line", line=entry.line, offset=entry.offset, reason=entry.reason)
            self.run_counts.bad_lines += 1
            round_counts.bad_lines += 1
            return
        claim = checkable(entry)
        if isinstance(claim, str):
            self.runs.close()
            self.log.debug("row_unverifiable", line=entry.line, offset=entry.offset, reason=claim)
            self.run_counts.unverifiable += 1
            round_counts.unverifiable += 1
            return
        read_before = self.run_counts.bytes_read
        # check() raises StopRequested mid-read: the row stays unchecked
        found = check(store, claim, self.cutoff, self._on_read)
        round_counts.bytes_read += self.run_counts.bytes_read - read_before
        if found.result == "pruned" and claim.received is not None:
            self.runs.pruned(entry, claim.received, self.cutoff)
        else:
            self.runs.close()
        for counts in (self.run_counts, round_counts):
            counts.checked += 1
            setattr(counts, found.result, getattr(counts, found.result) + 1)
        n = getattr(round_counts, found.result)  # this round's, counting this one
        report(self.log, claim, entry.line, found, n)

    def _on_read(self, n: int) -> None:
        self.run_counts.bytes_read += n
        self.pacer.consume(n)
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Between rows and inside reads: feed the watchdog, show progress,
        stop when asked to or when the time is up."""
        self.notifier.keepalive()
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + REPORT_INTERVAL_S
            fraction = self.cursor.offset / self.index_size if self.index_size else 1.0
            c = self.run_counts
            self.notifier.status(
                f"scrub round {self.cursor.round}: {fraction:.1%} of the index, "
                f"{c.checked} tarballs checked, {human_size(c.bytes_read)} read"
            )
            if self.bar is not None:
                self.bar.update(c.checked, c.bytes_read, fraction)
        self._stop_when_asked(now)

    def _waiting(self) -> None:
        """While a pass holds the state directory the scrub must settle:
        feed the watchdog, and end the wait at a stop or the deadline."""
        self.notifier.keepalive()
        self._stop_when_asked(time.monotonic())

    def _stop_when_asked(self, now: float) -> None:
        if self.should_stop():
            self.stopped_by = "signal"
        elif self.deadline is not None and now >= self.deadline:
            self.stopped_by = "max_duration"
        if self.stopped_by is not None:
            raise StopRequested

    def _save(self) -> None:
        assert self.state is not None
        saved, forgotten, only_index = self.runs.take_changes()
        try:
            with self.state.transaction():
                self.state.records.save(CURSOR, asdict(self.cursor))
                self.state.records.save_pruned_runs(saved, forgotten, only_index)
        except Exception as e:  # sqlite3.Error: busy past the timeout, disk full
            self.log.warning("scrub_cursor_save_failed", error=str(e))
        self._saved_at = time.monotonic()
        self._rows_since_save = 0

    def _summary(self) -> dict[str, object]:
        return {
            **asdict(self.run_counts),
            "pruned_unread": self.pruned_unread,
            "duration_s": round(time.monotonic() - self.started, 3),
            "round": self.cursor.round,
        }

    def _finish(self, completed: bool) -> ScrubRun:
        cursor = self.cursor
        summary = self._summary()
        if completed:
            now = time.time()
            self.log.info(
                "scrub_round_completed",
                round=cursor.round,
                duration_s=round(now - (cursor.round_started_at or now), 3),
                **asdict(cursor.counts),
            )
            cursor.last_round_completed_at = now
        done = self._done(completed)
        self.cursor = cursor.next_round() if completed else cursor
        self._save()
        if self.bar is not None:
            self.bar.clear()
        self.log.info("scrub_finished", **summary, round_completed=completed, stopped_by=self.stopped_by)
        self.notifier.stopping(f"scrub round {cursor.round} {'completed' if completed else 'paused'}")
        return done

    def _done(self, completed: bool, error: str | None = None) -> ScrubRun:
        """What this run did, for the action to judge and record."""
        cursor = self.cursor
        progress = 1.0 if completed else (cursor.offset / self.index_size if self.index_size else 0.0)
        return ScrubRun(
            started_at=self.started_at,
            duration_s=time.monotonic() - self.started,
            run=replace(self.run_counts),
            round=cursor.round,
            in_round=replace(cursor.counts),
            round_progress=progress,
            round_completed=completed,
            last_round_completed_at=cursor.last_round_completed_at,
            stopped_by=self.stopped_by,
            error=error,
        )
