"""One reconcile pass: find the tarballs index.jsonl lacks and append their rows.

    1. read the index, unlocked (IndexReader keeps what it parsed)
    2. list the store and keep the episodes the index lacks (in chunks of
       SCAN_CHUNK, so memory stays bounded and progress has a total)
    3. for each one that is settled, verify it
    4. every BATCH_ROWS rows (or BATCH_SECONDS), commit under the lock:
       catch up on what the receiver appended meanwhile, drop rows that became
       present, append the rest in one write, fdatasync, release

The lock is held only for step 4's short critical section, never while
reading tarballs.

Stopping: every slow step calls _checkpoint(), which feeds the watchdog and
raises StopRequested when a stop was asked for. Checkpoints are never inside
the locked section, so a commit that has the lock always finishes. After a
stop, rows already verified are committed if the lock is free at once.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from . import index as index_mod
from . import quarantine, state
from .config import Config
from .index import BadLine, IndexReader
from .lock import LockTimeout
from .log import Logger
from .notify import Notifier
from .pacing import ReadPacer
from .progress import Progress, human_size
from .state import HostMemo, HostTracker, Unverified
from .store import HostDir, Skipped, Store, Tarball, printable
from .verify import Intact, Unreadable, Unsettled, Unverifiable, Verdict, decoding_for, verify_one
from .workers import VerifyPool, default_workers

BATCH_ROWS = 1000
BATCH_SECONDS = 10.0
SCAN_CHUNK = 100_000  # candidate names held at once (a few MB)
MAX_BAD_LINE_EVENTS = 1000  # per pass; the count in the summary is always complete
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PassFailed(Exception):
    """The pass could not complete (lock timeout, index unwritable, disk full)."""

    def __init__(self, reason: str, summary: PassSummary) -> None:
        super().__init__(reason)
        self.summary = summary


class StopRequested(BaseException):
    """Raised at a checkpoint after SIGTERM/SIGINT. A BaseException so that no
    `except Exception` on the way (tarfile's hostile-input guard) swallows it."""


def iso_utc(ns: int) -> str:
    """A timestamp the way the receiver and the legacy tool write it."""
    return (_EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


def backfill_row(tarball: Tarball, intact: Intact, now_ns: int) -> dict[str, object]:
    """The legacy row (received_at_wall is the tarball's mtime, the best
    estimate of when the receiver got it) plus backfilled_at."""
    row: dict[str, object] = {
        "received_at_wall": iso_utc(tarball.mtime_ns),
        "host_id": tarball.host_id,
        "episode_id": tarball.episode_id,
        "sha256": intact.sha256,
        "size_bytes": intact.size,
        "schema_version": index_mod.SCHEMA_VERSION,
        "backfilled": True,
        "backfilled_at": iso_utc(now_ns),
    }
    if intact.commit:
        row["commit"] = intact.commit
    return row


@dataclass
class PassSummary:
    scanned: int = 0
    already_indexed: int = 0
    backfilled: int = 0
    raced: int = 0  # verified, but the receiver's row arrived before our commit
    corrupt: int = 0
    unverifiable: int = 0  # found now, or earlier and unchanged since (not read again)
    quarantined: int = 0
    in_flight: int = 0
    unsettled: int = 0
    unreadable: int = 0
    skipped: int = 0
    bad_index_lines: int = 0
    bytes_read: int = 0
    lock_wait_s: float = 0.0
    lock_held_max_s: float = 0.0
    duration_s: float = 0.0
    interrupted: bool = False
    full: bool = False  # listed every host directory and parsed the whole index
    hosts_listed: int = 0
    hosts_unchanged: int = 0  # not listed: unchanged since the last pass


@dataclass(frozen=True, slots=True)
class _Pending:
    tarball: Tarball
    intact: Intact
    row: dict[str, object]


class Reconciler:
    """Runs passes. Keeps its IndexReader between passes, so a long-running
    loop parses each index line once."""

    def __init__(
        self,
        cfg: Config,
        log: Logger,
        dry_run: bool = False,
        rows_out: TextIO | None = None,
        notifier: Notifier | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        full: bool = False,
        progress: Progress | None = None,
    ):
        self.cfg = cfg
        self.log = log
        self.dry_run = dry_run
        self.rows_out = rows_out or sys.stdout
        self.notifier = notifier or Notifier({})
        self.should_stop = should_stop
        self.reader = IndexReader(cfg.index)
        self.pacer = ReadPacer(cfg.max_read_rate, self._checkpoint)
        wanted = cfg.workers or default_workers()
        plan, self.decoding = decoding_for(cfg, wanted)
        self.workers = plan.workers
        if plan.max_window < cfg.max_window or plan.workers < wanted:
            log.warning(
                "memory_limited", workers=plan.workers, max_window=plan.max_window, limit=plan.limited_by
            )
        self.force_full = full
        self.progress = progress
        self.memos: dict[str, HostMemo] = {}  # what the last completed pass learned of each host dir
        self.unverified: dict[str, Unverified] = {}  # unverifiable tarballs by path, until they change
        self._unverified_now: dict[str, Unverified] = {}  # this pass's
        self.last_full_ns = 0
        self._state_dir = cfg.state_dir
        self._state_checked = False
        self._hosts = HostTracker({}, full=True)
        self._index_restarted = False
        self.orphan_rows: int | None = None  # index rows without a tarball, from the last full pass
        self._matched = 0  # listed tarballs with a row of their own host, this pass
        self._summary = PassSummary()
        self._bad_line_events = 0
        self._pending: list[_Pending] = []
        self._pending_since = 0.0
        self._progress = (0, 0)  # (candidates verified, candidates found)
        self._reading = 0  # bytes read by workers for verdicts not yet back

    # --- the pass -------------------------------------------------------------

    def run_pass(self) -> PassSummary:
        """One pass. Raises PassFailed; the summary event is logged either way.
        After a stop request it returns early with summary.interrupted set."""
        self._summary = summary = PassSummary()
        self._bad_line_events = 0
        self._pending = []
        self._unverified_now = {}
        self._progress = (0, 0)
        self.pacer = ReadPacer(self.cfg.max_read_rate, self._checkpoint)
        started, started_ns = time.monotonic(), time.time_ns()
        summary.full = self._prepare_state(started_ns)
        self._hosts = HostTracker(self.memos, summary.full)
        self._index_restarted = False
        self._matched = 0
        self.log.info(
            "pass_started",
            episodes_root=self.cfg.episodes_root,
            index=self.cfg.index,
            host=self.cfg.host,
            min_age_s=self.cfg.min_age,
            max_read_rate=self.cfg.max_read_rate,
            dry_run=self.dry_run,
        )
        try:
            try:
                self._reconcile()
            except StopRequested:
                summary.interrupted = True
                if self._pending:
                    with contextlib.suppress(StopRequested):
                        self._commit(wait_for_lock=False)
        except (LockTimeout, OSError) as e:
            summary.duration_s = round(time.monotonic() - started, 3)
            reason = _describe(e, self.cfg)
            self.log.error("pass_failed", error=reason, **asdict(summary))
            raise PassFailed(reason, summary) from e
        if not summary.interrupted and not self.dry_run:
            self._remember(summary.full, started_ns)
            if summary.full and self.cfg.host is None:
                # this pass's rows (ours, or the receiver's meanwhile) are for tarballs listed as unindexed
                rows = self.reader.keys.host_rows() - summary.backfilled - summary.raced
                self.orphan_rows = max(0, rows - self._matched)
        summary.bad_index_lines = self.reader.bad_lines
        summary.hosts_listed, summary.hosts_unchanged = self._hosts.listed, self._hosts.unchanged
        summary.duration_s = round(time.monotonic() - started, 3)
        if self.progress is not None:
            self.progress.clear()
        self.log.info("pass_finished", dry_run=self.dry_run, **asdict(summary))
        return summary

    def _reconcile(self) -> None:
        self.notifier.status("reading the index", force=True)
        self._catch_up_unlocked(self._checkpoint)
        if self.reader.torn_tail:
            self.log.warning("index_torn_tail", offset=self.reader.offset, line=self.reader.lines + 1)
        with Store(self.cfg.episodes_root) as store:
            for chunk in self._unindexed(store):
                self._progress = (self._progress[0], self._progress[1] + len(chunk))
                self._verify_chunk(store, chunk)
        if self._pending or (self.reader.torn_tail and not self.dry_run):
            self._commit()

    def _unindexed(self, store: Store) -> Iterator[list[tuple[str, str]]]:
        """(host_id, episode_id) of every episode the index lacks, in chunks."""
        chunk: list[tuple[str, str]] = []
        for host_id in store.host_ids(self.cfg.host):
            if isinstance(host_id, Skipped):
                self._skipped(host_id)
                continue
            self.notifier.status(f"listing {printable(host_id)}")
            for episode_id in self._listing(store, host_id):
                self._summary.scanned += 1
                if self.reader.keys.has_row(host_id, episode_id):
                    self._matched += 1
                    self._summary.already_indexed += 1
                    continue
                if episode_id in self.reader.keys.hostless:  # an old row without host_id
                    self._summary.already_indexed += 1
                    continue
                self._hosts.unresolved(host_id, episode_id)
                chunk.append((host_id, episode_id))
                if len(chunk) >= SCAN_CHUNK:
                    yield chunk
                    chunk = []
            self._checkpoint()
        if chunk:
            yield chunk

    def _listing(self, store: Store, host_id: str) -> list[str]:
        host = self._open_host(store, host_id)
        if host is None:
            return []
        with host:
            try:
                revisit = self._hosts.revisit_only(host_id, host.stat())
                if revisit is not None:
                    return list(revisit)  # unchanged since the last pass: no listing
                entries = host.entries()
            except OSError as e:
                self._skipped(Skipped(host_id, f"cannot list: {e.strerror}"))
                return []
        names = []
        for entry in entries:
            if isinstance(entry, Skipped):
                self._skipped(entry)
            else:
                names.append(entry)
        return names

    def _open_host(self, store: Store, host_id: str) -> HostDir | None:
        host = store.open_host(host_id)
        if host is None and self.cfg.host is not None:
            self.log.warning("host_not_found", host_id=host_id)
        if isinstance(host, Skipped):
            self._skipped(host)
            return None
        return host

    def _verify_chunk(self, store: Store, chunk: list[tuple[str, str]]) -> None:
        """Verify the settled tarballs of a chunk, in this process or in a
        pool of workers; either way the verdicts are handled here."""
        settled = self._settled(store, chunk)
        first = next(settled, None)
        if first is None:
            return
        todo = itertools.chain([first], settled)
        if self.workers == 1:
            for tarball in todo:
                self._handle(store, tarball, verify_one(store, tarball, self.decoding, self._on_read))
            return
        with VerifyPool(store, self.workers, self.cfg.max_read_rate, self.decoding) as pool:
            counted = 0  # bytes of finished verdicts, already in the summary

            def tick(progressed: bool) -> None:
                self._reading = pool.bytes_read - counted  # for the status line
                self._checkpoint(progressed)

            for tarball, verdict, read in pool.results(todo, tick):
                counted += read
                self._summary.bytes_read += read
                self._handle(store, tarball, verdict)
        self._reading = 0

    def _settled(self, store: Store, chunk: list[tuple[str, str]]) -> Iterator[Tarball]:
        """The tarballs of a chunk (in host order) that are old enough to
        verify; the rest are counted and reported here."""
        s = self._summary
        for host_id, group in itertools.groupby(chunk, key=operator.itemgetter(0)):
            host = store.open_host(host_id)  # removed or replaced since the listing: next pass
            if not isinstance(host, HostDir):
                continue
            with host:
                for _, episode_id in group:
                    tarball = host.lstat(episode_id)
                    if isinstance(tarball, Tarball):
                        age_s = (time.time_ns() - tarball.ctime_ns) / 1e9
                        known = self.unverified.get(tarball.path)
                        if known is not None and known.still(tarball, self.decoding.key):
                            s.unverifiable += 1  # unchanged since it was found unverifiable: not read again
                            self._unverified_now[tarball.path] = known
                            self.log.debug("tarball_unverifiable_unchanged", path=tarball.path)
                        elif age_s >= self.cfg.min_age:
                            yield tarball
                            continue
                        else:
                            s.in_flight += 1
                            self.log.debug("tarball_in_flight", path=tarball.path, age_s=round(age_s, 1))
                    else:
                        self._hosts.resolved(host_id, episode_id)  # gone, or not a file any more
                        if isinstance(tarball, Skipped):
                            self._skipped(tarball)
                    self._advance()  # removed since the listing, skipped or in flight

    def _advance(self) -> None:
        self._progress = (self._progress[0] + 1, self._progress[1])
        self._checkpoint()

    def _handle(self, store: Store, tarball: Tarball, verdict: Verdict) -> None:
        s = self._summary
        if isinstance(verdict, Intact):
            if verdict.commit_note:
                self.log.warning("tarball_without_commit", path=tarball.path, reason=verdict.commit_note)
            if not self._pending:
                self._pending_since = time.monotonic()
            row = backfill_row(tarball, verdict, time.time_ns())
            self._pending.append(_Pending(tarball, verdict, row))
        elif isinstance(verdict, Unsettled):
            s.unsettled += 1
            self.log.info("tarball_unsettled", path=tarball.path, reason=verdict.reason)
        elif isinstance(verdict, Unreadable):
            s.unreadable += 1
            self.log.warning("tarball_unreadable", path=tarball.path, reason=verdict.reason)
        elif isinstance(verdict, Unverifiable):
            s.unverifiable += 1
            self._unverified_now[tarball.path] = Unverified.of(tarball, self.decoding.key, verdict.reason)
            self.log.warning(
                "tarball_unverifiable", path=tarball.path, reason=verdict.reason, size_bytes=tarball.size
            )
        else:
            s.corrupt += 1
            unchanged_s = (time.time_ns() - tarball.ctime_ns) / 1e9
            wait_s = max(0.0, self.cfg.quarantine_min_age - unchanged_s) if self.cfg.quarantine_dir else None
            self.log.warning(
                "tarball_corrupt",
                path=tarball.path,
                reason=verdict.reason,
                size_bytes=tarball.size,
                **({} if not wait_s else {"quarantine_in_s": round(wait_s)}),
            )
            if wait_s == 0 and self.cfg.quarantine_dir is not None and not self.dry_run:
                self._quarantine(store, tarball, verdict.reason, self.cfg.quarantine_dir)
        self._advance()
        if self._pending and (
            len(self._pending) >= BATCH_ROWS or time.monotonic() - self._pending_since >= BATCH_SECONDS
        ):
            self._commit()

    def _quarantine(self, store: Store, tarball: Tarball, reason: str, qdir: Path) -> None:
        host = store.open_host(tarball.host_id)
        if not isinstance(host, HostDir):
            return  # the host directory went away: nothing to move
        with host:
            try:
                moved = quarantine.move(host, tarball, reason, qdir, iso_utc(time.time_ns()))
            except OSError as e:
                self.log.warning("quarantine_failed", path=tarball.path, error=e.strerror or str(e))
                return
        self._summary.quarantined += 1
        self._hosts.resolved(tarball.host_id, tarball.episode_id)
        self.log.warning("tarball_quarantined", path=tarball.path, quarantine_path=moved, reason=reason)

    def _on_read(self, n: int) -> None:
        self._summary.bytes_read += n
        self.pacer.consume(n)
        self._checkpoint()

    def _checkpoint(self, progressed: bool = True) -> None:
        """A safe point: feed the watchdog (only if work moved on), report
        progress, honour a stop."""
        if progressed:
            self.notifier.alive()
        done, found = self._progress
        if found:
            read = self._summary.bytes_read + self._reading
            self.notifier.status(f"verifying {done}/{found} unindexed tarballs, {human_size(read)} read")
            if self.progress is not None:
                self.progress.update(done, read, done / found)
        if self.should_stop():
            raise StopRequested

    def _skipped(self, skipped: Skipped) -> None:
        self._summary.skipped += 1
        self.log.warning("store_entry_skipped", path=skipped.path, reason=skipped.reason)

    # --- what the next pass remembers ----------------------------------------------

    def _prepare_state(self, now_ns: int) -> bool:
        """Load the state file on the first pass; say whether this pass is a
        full one (asked for, due, or nothing remembered yet)."""
        if not self._state_checked:
            self._state_checked = True
            self._load_state()
        every = self.cfg.full_every
        full = self.force_full or (every is not None and now_ns - self.last_full_ns >= every * 1e9)
        if full:
            self.reader = IndexReader(self.cfg.index)  # parse it all again
        return full

    def _load_state(self) -> None:
        state_dir = self._state_dir
        if state_dir is None:
            return
        if not state_dir.is_dir():
            self.log.info("state_disabled", state_dir=state_dir, reason="not a directory")
            self._state_dir = None
            return
        try:
            snap = state.load(state_dir)
        except state.StateInvalid as e:
            self.log.warning("state_ignored", state_dir=state_dir, reason=str(e))
            return
        if snap is None:
            return
        if (snap.episodes_root, snap.index_path) != (str(self.cfg.episodes_root), str(self.cfg.index)):
            self.log.info("state_ignored", state_dir=state_dir, reason="written for another store or index")
        elif not state.resume_reader(snap, self.reader):
            self.log.info("state_ignored", state_dir=state_dir, reason="the index was replaced or rewritten")
        else:
            self.memos, self.last_full_ns, self.unverified = snap.hosts, snap.last_full_ns, snap.unverified
            self.log.debug("state_loaded", index_offset=snap.index_offset, hosts=len(snap.hosts))

    def _remember(self, full: bool, started_ns: int) -> None:
        """After a completed pass: keep what it learned, in memory and on disk.
        The reader first catches up past the rows this pass appended, so the
        saved offset covers them and a later truncation is noticed."""
        try:
            self._catch_up_unlocked(self.notifier.alive)
        except OSError as e:
            self.memos = {}
            self.log.warning("state_save_failed", state_dir=self._state_dir, error=e.strerror or str(e))
            return
        self.memos = {} if self._index_restarted else self._hosts.memos(self.memos, self.cfg.host)
        only = self.cfg.host
        kept = {p: u for p, u in self.unverified.items() if only is not None and u.host_id != only}
        self.unverified = {**kept, **self._unverified_now}
        if full:
            self.last_full_ns = started_ns
        if self._state_dir is None or self.reader.identity is None:
            return
        try:
            fd = os.open(self.cfg.index, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != self.reader.identity:
                    return  # replaced since we parsed it; the next pass parses it whole
                tail = state.tail_digest(fd, self.reader.offset)
            finally:
                os.close(fd)
            dev, ino = self.reader.identity
            snap = state.Snapshot(
                episodes_root=str(self.cfg.episodes_root),
                index_path=str(self.cfg.index),
                index_dev=dev,
                index_ino=ino,
                index_offset=self.reader.offset,
                index_lines=self.reader.lines,
                index_bad_lines=self.reader.bad_lines,
                index_tail_sha256=tail,
                last_full_ns=self.last_full_ns,
                hosts=self.memos,
                unverified=self.unverified,
                keys=self.reader.keys,
            )
            state.save(self._state_dir, snap)
        except OSError as e:
            self.log.warning("state_save_failed", state_dir=self._state_dir, error=e.strerror or str(e))

    # --- the index --------------------------------------------------------------

    def _on_bad_line(self, bad: BadLine) -> None:
        self._bad_line_events += 1
        if self._bad_line_events <= MAX_BAD_LINE_EVENTS:
            self.log.warning("index_bad_line", line=bad.line, offset=bad.offset, reason=bad.reason)
        elif self._bad_line_events == MAX_BAD_LINE_EVENTS + 1:
            self.log.warning("index_bad_line_events_suppressed", after=MAX_BAD_LINE_EVENTS)

    def _catch_up(self, fd: int, on_progress: Callable[[], None]) -> None:
        if self.reader.catch_up(fd, self._on_bad_line, on_progress):
            self._index_restarted = True  # what the host memos assumed indexed may not be
            self.log.warning("index_restarted", reason="index replaced or shrank; parsed from the start")

    def _catch_up_unlocked(self, on_progress: Callable[[], None]) -> None:
        try:
            fd = os.open(self.cfg.index, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # nothing indexed yet; the first commit creates it
        try:
            self._catch_up(fd, on_progress)
        finally:
            os.close(fd)

    def _commit(self, wait_for_lock: bool = True) -> None:
        """Append the pending rows. With wait_for_lock=False (after a stop
        request) give up at once if the lock is busy: the rows are verified
        again next pass, which is cheaper than delaying a stop."""
        pending, self._pending = self._pending, []
        # most of what the receiver appended, before locking
        self._catch_up_unlocked(self._checkpoint if wait_for_lock else self.notifier.alive)
        if self.dry_run:
            fresh, raced = self._partition(pending)
            for p in fresh:
                self.rows_out.write(index_mod.encode_row(p.row).decode("ascii"))
            self.rows_out.flush()
            self._report(fresh, raced)
            return
        waited = False

        def on_wait() -> None:
            nonlocal waited
            if not wait_for_lock:
                self.log.info("rows_left_for_next_pass", rows=len(pending), reason="stopping, lock busy")
                raise StopRequested
            if not waited:
                waited = True
                self.log.info("index_lock_waiting", lock_file=self.cfg.lock_path)
                self.notifier.status(f"waiting for index lock {self.cfg.lock_path}", force=True)
            self._checkpoint()

        asked = time.monotonic()
        with index_mod.locked(self.cfg.index, self.cfg.lock_file, self.cfg.lock_timeout, on_wait) as ix:
            locked_at = time.monotonic()
            self._catch_up(ix.fd, self.notifier.alive)  # no checkpoint: a locked commit always finishes
            torn = self.reader.torn_tail
            fresh, raced = self._partition(pending)
            written = ix.append([index_mod.encode_row(p.row) for p in fresh])
            self.reader.skip_own(ix.fd, written, [(p.tarball.host_id, p.tarball.episode_id) for p in fresh])
            held = time.monotonic() - locked_at
        # everything below happens after the lock is released
        s = self._summary
        s.lock_wait_s = round(s.lock_wait_s + locked_at - asked, 4)
        s.lock_held_max_s = round(max(s.lock_held_max_s, held), 4)
        if torn:
            self.log.info("index_torn_tail_terminated", offset=self.reader.offset)
        if written:
            self.log.info(
                "index_appended",
                rows=len(fresh),
                bytes=written,
                lock_wait_s=round(locked_at - asked, 4),
                lock_held_s=round(held, 4),
            )
        self._report(fresh, raced)

    def _partition(self, pending: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """(rows still missing, rows the receiver appended since we looked)."""
        fresh: list[_Pending] = []
        raced: list[_Pending] = []
        for p in pending:
            covered = self.reader.keys.covers(p.tarball.host_id, p.tarball.episode_id)
            (raced if covered else fresh).append(p)
        return fresh, raced

    def _report(self, fresh: list[_Pending], raced: list[_Pending]) -> None:
        s = self._summary
        s.raced += len(raced)
        s.backfilled += len(fresh)
        for p in (*fresh, *raced):
            self._hosts.resolved(p.tarball.host_id, p.tarball.episode_id)
        for p in raced:
            self.log.info("row_already_present", path=p.tarball.path)
        event = "row_would_backfill" if self.dry_run else "row_backfilled"
        for p in fresh:
            self.log.info(
                event,
                path=p.tarball.path,
                host_id=p.tarball.host_id,
                episode_id=p.tarball.episode_id,
                sha256=p.intact.sha256,
                size_bytes=p.intact.size,
                commit=p.intact.commit,
                zstd_checksum=p.intact.checksummed,
            )


def _describe(error: BaseException, cfg: Config) -> str:
    if isinstance(error, LockTimeout):
        return f"{error} (the receiver or another reconciler holds it)"
    if isinstance(error, index_mod.IndexWriteError):
        return f"appending to {cfg.index}: {error}"
    if isinstance(error, OSError):
        where = error.filename or cfg.index
        return f"{where}: {error.strerror or error}"
    return str(error)
