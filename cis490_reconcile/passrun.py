"""One reconcile pass: find the tarballs index.jsonl lacks and append their rows.

    1. catch up: read what the index gained into the state database
       (everything on a full pass)
    2. list (scan.py): each host directory that changed since the last pass
       is listed and checked against the index; one that did not is only
       looked at for the episodes it left unresolved. Candidates come a
       host at a time (at most scan.SCAN_CHUNK), listed as verifying asks
       for more: memory stays bounded, and the workers start on the first
       host while the next is listed.
    3. verify each candidate that is settled (older than min_age, scan.py);
       `record` is the one place a verdict is counted, logged and acted on
    4. commit every BATCH_ROWS rows or BATCH_SECONDS, and at the end
       (commit.py: the only step that takes the index lock)
    5. remember (scan.py): host directory memos, unverifiable tarballs, orphan counts

Stopping: every slow step calls `checkpoint`, which feeds the watchdog and
raises StopRequested when a stop was asked for. Checkpoints are never inside
the locked section, so a commit that has the lock always finishes. After a
stop, rows already verified are committed if the lock is free at once,
including the verdicts the workers had made and not yet handed over.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Generator, Iterable, Iterator

from . import basics, index, quarantine
from .basics import human_size, iso_utc
from .commit import Committed, Committer, Pending
from .coverage import Coverage
from .indexkeys import CatchUp
from .lock import LockTimeout
from .log import Events
from .passdata import PassContext, PassSummary, WorkerDied
from .reading import ReadPacer
from .runtime import StopRequested
from .scan import Scan
from .state import State
from .store import HostDir, Store, Tarball
from .verdicts import Corrupt, Intact, Unreadable, Unsettled, Unverifiable, Verdict

BATCH_ROWS = 1000
BATCH_SECONDS = 10.0


class PassRun:
    def __init__(self, env: PassContext, state: State, full: bool) -> None:
        self.env = env
        self.cfg = env.cfg
        self.log = env.log
        self.state = state
        self.coverage = Coverage(state)
        self.events = Events(env.log)
        self.committer = Committer(
            self.cfg, self.coverage, self._read, env.dry_run, env.rows_out, env.notifier.keepalive
        )
        self.summary = PassSummary(full=full)
        self.scan = Scan(env, state, self.coverage, self.events, self.summary, self._looked_at)
        self.pending: list[Pending] = []
        self.pending_since = 0.0
        self.verified = self.found = 0  # candidates looked at, candidates found
        self.reading = 0  # bytes read by workers for verdicts not yet back
        self.unclaimed: list[tuple[Tarball, Verdict, int]] = []  # made by workers, not yet recorded
        self.worker_died = False  # the pool found a worker dead
        self.replaced = False  # the index was replaced: the memos cannot be trusted
        self.torn_reported = False
        self.store: Store | None = None

    # --- the pass -------------------------------------------------------------------

    def run(self) -> None:
        env, s = self.env, self.summary
        env.notifier.status("reading the index", force=True)
        self.committer.catch_up(s.full, self.checkpoint)
        basics.step("caught_up")
        with Store(self.cfg.episodes_root) as store:
            self.store = store
            try:
                self._verify(store, self._settled(store))
            except StopRequested:
                self._record_unclaimed()
                if not self.worker_died:
                    raise
                self._keep_verified()  # the stop came after a worker died: the death is what is said
                raise WorkerDied from None
            except WorkerDied:
                self._record_unclaimed()
                self._keep_verified()
                raise
        if self.pending or not env.dry_run:
            self._commit()  # also ends a torn last line

    def stop(self) -> None:
        """After a stop request: commit what is verified if the lock is free now."""
        self.summary.interrupted = True
        if self.pending and not self.env.dry_run:
            with contextlib.suppress(StopRequested):
                self._commit(wait_for_lock=False)

    def _keep_verified(self) -> None:
        """After a worker died: commit what was verified before it did. A
        stop while that commit waits for the lock gets stop()'s one last
        try, and the pass still fails for the death, not as interrupted."""
        try:
            if self.pending:
                self._commit()
        except StopRequested:
            self.stop()

    def checkpoint(self, progressed: bool = True) -> None:
        """A safe point: feed the watchdog (only if work moved on), report
        progress, honour a stop."""
        env = self.env
        if progressed:
            env.notifier.keepalive()
        if self.found:
            read = self.summary.bytes_read + self.reading
            env.notifier.status(
                lambda: f"verifying {self.verified}/{self.found} unindexed tarballs, {human_size(read)} read"
            )
            if env.bar is not None:
                env.bar.update(self.verified, read, self.verified / self.found)
        if env.should_stop():
            raise StopRequested

    def _looked_at(self) -> None:
        """One more candidate has its verdict (or needs none this pass)."""
        self.verified += 1
        self.checkpoint()

    def remember(self) -> None:
        """After a completed pass: what the next pass needs (scan.py)."""
        self.scan.remember(self.replaced)

    def _read(self, found: CatchUp) -> None:
        """What a catch-up of the index found."""
        if found.rebuilt:
            self.summary.full = True  # read the whole index: list every host too
        if found.replaced:
            self.replaced = True
            self.scan.index_replaced()  # orphans counted before, of the old index: not saved
            self.log.warning("index_restarted", reason="index replaced or shrank; read from the start")
        for bad in found.bad:
            self.events.warning("index_bad_line", line=bad.line, offset=bad.offset, reason=bad.reason)
        if found.torn is not None and not self.torn_reported:
            self.torn_reported = True
            self.log.warning("index_torn_tail", offset=found.torn.offset, line=found.torn.line)

    # --- verifying --------------------------------------------------------------------

    def _settled(self, store: Store) -> Iterator[Tarball]:
        """Every candidate settled enough to verify, listed as the workers
        ask for more: the next host is listed while they read this one's."""
        for chunk in self.scan.candidates(store, self.checkpoint):
            self.found += len(chunk)
            yield from self.scan.settled(store, chunk)

    def _verify(self, store: Store, tarballs: Iterator[Tarball]) -> None:
        """Verify the tarballs, here or in the workers; either way each
        verdict is recorded here, and commits are due here."""
        with contextlib.closing(self._verdicts(store, tarballs)) as verdicts:  # ended early: pool.finish()
            for tarball, verdict in verdicts:
                self.record(tarball, verdict)
                self._looked_at()
                if self.pending and (
                    len(self.pending) >= BATCH_ROWS or time.monotonic() - self.pending_since >= BATCH_SECONDS
                ):
                    self._commit()

    def _record_unclaimed(self) -> None:
        """Record the verdicts a stop (or a dead worker) kept from _verify:
        the store is still open for a quarantine, and stop() commits the
        rows if the lock is free. No checkpoint: the stop is known."""
        unclaimed, self.unclaimed = self.unclaimed, []
        for tarball, verdict, read in unclaimed:
            self.summary.bytes_read += read
            self.record(tarball, verdict)

    def _verdicts(
        self, store: Store, tarballs: Iterable[Tarball]
    ) -> Generator[tuple[Tarball, Verdict], None, None]:
        """Verdicts in this process (workers 1) or from a pool. Reading code
        (zstandard, tarfile, multiprocessing) is imported only once there is
        a tarball to read: a pass with nothing to do does not pay for it."""
        todo = iter(tarballs)
        first = next(todo, None)
        if first is None:
            return
        todo = itertools.chain([first], todo)
        env = self.env
        if env.workers == 1:
            from .verify import verify_many

            pacer = ReadPacer(self.cfg.max_read_rate, self.checkpoint)

            def on_read(n: int) -> None:
                self.summary.bytes_read += n
                pacer.consume(n)
                self.checkpoint()

            yield from verify_many(store, todo, env.decoding, on_read)
            return
        from .workers import VerifyPool

        with VerifyPool(store, env.workers, self.cfg.max_read_rate, env.decoding) as pool:
            counted = 0  # bytes of finished verdicts, already in the summary

            def tick(progressed: bool) -> None:
                self.reading = pool.bytes_read - counted  # for the status line
                self.checkpoint(progressed)

            try:
                for tarball, verdict, read in pool.results(todo, tick):
                    counted += read
                    self.summary.bytes_read += read
                    yield tarball, verdict
            finally:  # ended early (a stop, a failure): what the workers verified is kept
                self.unclaimed = pool.finish()
                self.worker_died = pool.broken
        self.reading = 0
        if self.worker_died:  # after every batch was back: still a death, and said
            raise WorkerDied

    def record(self, tarball: Tarball, verdict: Verdict) -> None:
        """The one place a verdict is counted, logged and acted on."""
        s = self.summary
        if isinstance(verdict, Intact):
            if verdict.commit_note:
                self.events.warning("tarball_without_commit", path=tarball.path, reason=verdict.commit_note)
            if not self.pending:
                self.pending_since = time.monotonic()
            row = index.backfill_row(tarball, verdict, time.time_ns())
            self.pending.append(Pending(tarball, verdict, row))
        elif isinstance(verdict, Unsettled):
            s.unsettled += 1
            self.events.info("tarball_unsettled", path=tarball.path, reason=verdict.reason)
        elif isinstance(verdict, Unreadable):
            s.unreadable += 1
            self.events.warning("tarball_unreadable", path=tarball.path, reason=verdict.reason)
        elif isinstance(verdict, Unverifiable):
            s.unverifiable += 1
            self.scan.unverifiable(tarball, verdict.reason)
            self.events.warning(
                "tarball_unverifiable", path=tarball.path, reason=verdict.reason, size_bytes=tarball.size
            )
        else:
            self._corrupt(tarball, verdict)

    def _corrupt(self, tarball: Tarball, verdict: Corrupt) -> None:
        self.summary.corrupt += 1
        qdir = self.cfg.quarantine_dir
        wait_s = None
        if qdir is not None:
            wait_s = max(0.0, self.cfg.quarantine_min_age - tarball.age_s())
        facts: dict[str, object] = {
            "path": tarball.path,
            "reason": verdict.reason,
            "size_bytes": tarball.size,
        }
        if wait_s:
            facts["quarantine_in_s"] = round(wait_s)
        self.events.warning("tarball_corrupt", **facts)
        if qdir is None or wait_s or self.env.dry_run or self.store is None:
            return
        host = self.store.open_host(tarball.host_id)
        if not isinstance(host, HostDir):
            return  # the host directory went away: nothing to move
        with host:
            try:
                moved = quarantine.move(host, tarball, verdict.reason, qdir, iso_utc(time.time_ns()))
            except OSError as e:
                self.events.warning("quarantine_failed", path=tarball.path, error=e.strerror or str(e))
                return
        self.summary.quarantined += 1  # moved, even if not confirmed: no longer in the store
        self.scan.resolved(tarball)
        facts = {
            "path": tarball.path,
            "quarantine_path": moved.path,
            "reason": verdict.reason,
        }
        if moved.unconfirmed is not None:
            facts["error"] = moved.unconfirmed
        self.events.warning("tarball_quarantined", **facts)

    # --- committing ---------------------------------------------------------------------

    def _commit(self, wait_for_lock: bool = True) -> None:
        """Append the pending rows. Without wait_for_lock (stopping), give up
        at once if the lock is busy: the rows are verified again next pass."""
        pending, self.pending = self.pending, []
        waited = False

        def on_wait() -> None:
            nonlocal waited
            if not wait_for_lock:
                self.log.info("rows_left_for_next_pass", rows=len(pending), reason="stopping, lock busy")
                raise StopRequested
            if not waited:
                waited = True
                self.log.info("index_lock_waiting", lock_file=self.cfg.lock_path)
                self.env.notifier.status(f"waiting for index lock {self.cfg.lock_path}", force=True)
            self.checkpoint()

        done = Committed()
        try:
            self.committer.commit(pending, on_wait, done)
        except StopRequested:  # asked while the lock was busy, before a byte was written
            self.pending = pending + self.pending  # stop() tries once more, if the lock is free
            raise
        except LockTimeout:  # a wait that ended in failure is a wait too (the alert on lock waits sees it)
            self.summary.lock_wait_s = round(self.summary.lock_wait_s + done.lock_wait_s, 4)
            raise
        except BaseException:  # after the append (the state disk full): the rows are in the index, say so
            if done.written:
                self._report(done)
            raise
        self._report(done)

    def _report(self, done: Committed) -> None:
        s = self.summary
        s.lock_wait_s = round(s.lock_wait_s + done.lock_wait_s, 4)
        s.lock_held_max_s = round(max(s.lock_held_max_s, done.lock_held_s), 4)
        s.raced += len(done.raced)
        s.backfilled += len(done.fresh)
        if done.terminated_torn_tail:
            self.log.info("index_torn_tail_terminated")
        if done.written:
            self.log.info(
                "index_appended",
                rows=len(done.fresh),
                bytes=done.written,
                lock_wait_s=round(done.lock_wait_s, 4),
                lock_held_s=round(done.lock_held_s, 4),
            )
        for p in (*done.fresh, *done.raced):
            self.scan.resolved(p.tarball)
        for p in done.raced:
            self.events.info("row_already_present", path=p.tarball.path)
        event = "row_would_backfill" if self.env.dry_run else "row_backfilled"
        for p in done.fresh:
            self.events.info(
                event,
                path=p.tarball.path,
                host_id=p.tarball.host_id,
                episode_id=p.tarball.episode_id,
                sha256=p.intact.sha256,
                size_bytes=p.intact.size,
                commit=p.intact.commit,
                zstd_checksum=p.intact.checksummed,
            )
