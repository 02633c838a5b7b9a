"""Committing verified rows: the one place that takes the index lock.

Under the lock, in this order: read what the receiver appended since we last
looked, drop pending rows whose key is now present (the receiver's own row
arrived while we verified), append the rest in ONE write on an O_APPEND fd
(a torn last line is terminated in the same write), fdatasync, release.
Most of the receiver's rows are read just before locking, so the locked
section is short, and under the lock the index is only read on from the
checkpoint: one replaced since (the checkpoint does not fit it) is read whole
after the lock is let go, then the lock is taken again (the last of
LOCKED_ATTEMPTS reads it under the lock, should it be replaced every time).
After the release our own rows are read back into the state database like
any other appended rows.

Crash windows, and why each is harmless:
- killed before the write: nothing appended; the rows are verified again.
- between write() and fdatasync: the rows may or may not reach the disk;
  either way the index holds whole lines, and what is there is read next time.
- between the append and the database commit that covers it: the checkpoint
  is still before our rows, so the next pass reads them like the receiver's.
A dry run does everything up to the append and prints the rows instead.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TextIO

from . import basics, index
from .config import Config
from .coverage import Coverage, NotReadOn
from .indexkeys import CatchUp
from .lock import LockTimeout
from .store import Tarball
from .verdicts import Intact

LOCKED_ATTEMPTS = 3  # an index replaced again each time: the last reads it whole, under the lock


class Pending(NamedTuple):
    tarball: Tarball
    intact: Intact
    row: dict[str, object]


@dataclass
class Committed:
    fresh: list[Pending] = field(default_factory=list)  # appended (or, in a dry run, printed)
    raced: list[Pending] = field(default_factory=list)  # the receiver's row arrived first
    written: int = 0  # bytes appended
    terminated_torn_tail: bool = False
    lock_wait_s: float = 0.0
    lock_held_s: float = 0.0


class Committer:
    def __init__(
        self,
        cfg: Config,
        coverage: Coverage,
        on_read: Callable[[CatchUp], None],
        dry_run: bool = False,
        rows_out: TextIO | None = None,
        keepalive: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self.coverage = coverage
        self.on_read = on_read  # what each catch-up found (bad lines, a torn tail)
        self.dry_run = dry_run
        self.rows_out = rows_out
        # fed as a catch-up of a commit reads (the index replaced: read whole, maybe under the
        # lock): the watchdog's, never a stop's, as a commit that started finishes
        self.keepalive = keepalive

    def catch_up(self, full: bool = False, on_progress: Callable[[], None] | None = None) -> None:
        """Read what the index gained, without the lock (it is append-only:
        an unlocked reader sees whole lines plus at most a torn tail)."""
        fd = index.open_for_reading(self.cfg.index)  # None: none yet, or gone (no rows); a commit makes it
        try:
            self.on_read(self.coverage.catch_up(fd, full, on_progress or self.keepalive))
        finally:
            if fd is not None:
                os.close(fd)

    def _partition(self, pending: list[Pending], done: Committed) -> None:
        """Fresh: the rows whose key the index lacks, each key once (a key
        twice in `pending` would otherwise be appended twice)."""
        keys = [(p.tarball.host_id, p.tarball.episode_id) for p in pending]
        seen: set[tuple[str, str]] = set()
        for p, key, covered in zip(pending, keys, self.coverage.covered(keys), strict=True):
            (done.raced if covered or key in seen else done.fresh).append(p)
            seen.add(key)

    def commit(self, pending: list[Pending], on_wait: Callable[[], None], done: Committed) -> None:
        """Append the rows of `pending` the index still lacks; what was done,
        into `done`, which holds the wait for the lock even when the wait
        ends in LockTimeout. on_wait is called while the lock is busy (it may
        raise to give up)."""
        self.catch_up()
        if not pending and not self.cfg.index.exists():
            return  # the receiver makes its index, with its owner and mode: one of ours may lock it out
        if self.dry_run:
            self._partition(pending, done)
            out = self.rows_out or sys.stdout
            out.write("".join(index.encode_row(p.row).decode("ascii") for p in done.fresh))
            out.flush()
            return
        attempt = 1
        while (appended := self._locked(pending, done, on_wait, attempt == LOCKED_ATTEMPTS)) is None:
            self.catch_up()  # replaced since the last catch-up: read it whole, without the lock
            attempt += 1
        fd_read, start, lines = appended
        self.on_read(fd_read)
        basics.step("appended")
        if done.written:
            self._ours(start, lines, [p.row for p in done.fresh], done.terminated_torn_tail)

    def _locked(
        self, pending: list[Pending], done: Committed, on_wait: Callable[[], None], whole: bool
    ) -> tuple[CatchUp, int, list[bytes]] | None:
        """The locked section: (what was read on, where our lines start, our
        lines); None, with nothing written, when the index must be read whole
        first (unless `whole`). Each section adds its wait for the lock to
        done.lock_wait_s, a timeout's too (never the reads between sections:
        nobody held the lock then), and keeps the longest hold."""
        asked = time.monotonic()
        try:
            with index.locked(self.cfg.index, self.cfg.lock_file, self.cfg.lock_timeout, on_wait) as ix:
                locked_at = time.monotonic()
                done.lock_wait_s += locked_at - asked
                try:  # no checkpoint here: a commit that holds the lock finishes
                    fd_read = self.coverage.catch_up(ix.fd, False, self.keepalive, whole)
                    done.terminated_torn_tail = ix.ends_torn()
                    self._partition(pending, done)
                    lines = [index.encode_row(p.row) for p in done.fresh]
                    start = os.fstat(ix.fd).st_size
                    done.written = ix.append(lines)
                except NotReadOn:
                    return None
                finally:
                    done.lock_held_s = max(done.lock_held_s, time.monotonic() - locked_at)
        except LockTimeout:
            done.lock_wait_s += time.monotonic() - asked
            raise
        return fd_read, start, lines

    def _ours(self, start: int, lines: list[bytes], rows: list[dict[str, object]], terminated: bool) -> None:
        """Our own rows, into the database: as written, when they are the
        next lines the checkpoint expects; read back like any others when a
        torn line was ended first (it is a line of its own now) or the index
        is not where the checkpoint left it."""
        fd = index.open_for_reading(self.cfg.index)
        try:
            if fd is not None and not terminated and self.coverage.appended(fd, start, lines, rows):
                return
        finally:
            if fd is not None:
                os.close(fd)
        self.catch_up()
