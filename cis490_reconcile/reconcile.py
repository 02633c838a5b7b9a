"""Running passes: what lasts from one pass to the next.

A Reconciler is made once per process (per configuration, in a loop) with
the decoding limits and worker count its memory plan allows. Each run_pass
opens the state database for that pass (statedir.py: owned under the state
directory's lock, temporary, or a read-only view for a dry run) and runs a
PassRun on it, which holds everything that belongs to one pass. The
pass_started / pass_finished (or pass_failed) events come from here; the
last pass's record is the outcome sinks' to write (outcome.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TextIO

from . import statedir, syscalls
from .config import Config
from .index import IndexWriteError
from .lock import LockTimeout
from .log import Logger
from .notify import Notifier
from .passdata import PassContext, PassSummary, WorkerDied
from .passrun import PassRun
from .runtime import StopRequested
from .state import State, damaged
from .statedir import StateBusy, TempState
from .termbar import TerminalBar
from .verdicts import decoding_for


class PassFailed(Exception):
    """The pass could not complete (lock timeout, index unwritable, disk
    full, another pass holding the state directory): why, and the counts so far."""

    def __init__(self, reason: str, summary: PassSummary) -> None:
        super().__init__(reason)
        self.reason, self.summary = reason, summary


class Reconciler:
    def __init__(
        self,
        cfg: Config,
        log: Logger,
        notifier: Notifier | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        *,
        dry_run: bool = False,
        rows_out: TextIO | None = None,
        full: bool = False,
        bar: TerminalBar | None = None,
    ) -> None:
        wanted = cfg.workers or syscalls.cpu_count()
        plan, decoding = decoding_for(cfg, wanted)
        if plan.max_window < cfg.max_window or plan.workers < wanted:
            log.warning(
                "memory_limited", workers=plan.workers, max_window=plan.max_window, limit=plan.limited_by
            )
        self.context = PassContext(
            cfg, log, notifier or Notifier({}), should_stop, decoding, plan.workers, dry_run, rows_out, bar
        )
        self.cfg, self.log = cfg, log
        self.force_full = full
        self.orphans: tuple[int, int] | None = None  # (missing, pruned) rows without tarball, last full pass
        # the last pass ended (busy, or stopped) waiting for another pass to release the state
        # directory: it did nothing, and that pass's record and metrics are the ones to keep
        self.turned_away = False
        self._temp: TempState | None = None  # the database of a process that keeps none

    def close(self) -> None:
        if self._temp is not None:
            self._temp.close()
            self._temp = None

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _full(self, state: State) -> bool:
        every, cp = self.cfg.full_every, state.keys.checkpoint(state.last)
        due = cp is None or (every is not None and time.time() - cp.rebuilt_at >= every)
        return self.force_full or due

    # --- a pass -------------------------------------------------------------------------

    def run_pass(self) -> PassSummary:
        """One pass. Raises PassFailed; the summary event is logged either way.
        After a stop request it returns early with summary.interrupted set."""
        ctx = self.context
        started = time.monotonic()
        self.turned_away = False
        ctx.log.info(
            "pass_started",
            episodes_root=self.cfg.episodes_root,
            index=self.cfg.index,
            host=self.cfg.host,
            min_age_s=self.cfg.min_age,
            max_read_rate=self.cfg.max_read_rate,
            dry_run=ctx.dry_run,
        )
        try:
            summary = self._in_state()
        except PassFailed as e:
            e.summary.duration_s = round(time.monotonic() - started, 3)
            self.log.error("pass_failed", error=e.reason, **asdict(e.summary))
            raise
        summary.duration_s = round(time.monotonic() - started, 3)
        if ctx.bar is not None:
            ctx.bar.clear()
        ctx.log.info("pass_finished", dry_run=ctx.dry_run, **asdict(summary))
        return summary

    def _in_state(self) -> PassSummary:
        """The pass in its state database: a view for a dry run (it writes
        nothing of ours), the kept one under the state directory's lock, or
        a temporary one."""
        if self.context.dry_run:
            with statedir.view(self.cfg, self.log) as view:
                return self._run(lambda: view, close=False)
        state_dir = self.cfg.state_dir
        problem = None if state_dir is None else statedir.writable(state_dir)
        if state_dir is None or problem is not None:
            if problem is not None:
                self.log.warning("state_dir_unusable", state_dir=state_dir, reason=problem)
            if self._temp is None:
                self._temp = TempState()
            temp = self._temp.path
            return self._run(lambda: statedir.open_state(temp, self.cfg, self.log))
        try:
            with statedir.owned(self.cfg, self.log, self._waiting) as path:
                try:
                    summary = self._run(lambda: statedir.open_state(path, self.cfg, self.log))
                except PassFailed as e:
                    if not isinstance(e.__cause__, sqlite3.DatabaseError) or not damaged(e.__cause__):
                        raise
                    self.log.warning("state_rebuilt", state_dir=state_dir, reason=str(e.__cause__))
                    statedir.discard(path)  # still ours: the directory's lock is held
                    summary = self._run(lambda: statedir.open_state(path, self.cfg, self.log))
                if not summary.interrupted:  # the first good pass with the database retires the old files
                    statedir.remove_old_files(state_dir, self.log)
                return summary
        except StateBusy as e:
            self.turned_away = True
            raise PassFailed(str(e), PassSummary()) from e
        except StopRequested:  # from _waiting: the pass's own stops end in _run
            self.turned_away = True
            return PassSummary(interrupted=True)

    def _waiting(self) -> None:
        """While another pass holds the state directory: a lock wait like
        the index's, so it feeds the watchdog and ends at a stop."""
        self.context.notifier.keepalive()
        if self.context.should_stop():
            raise StopRequested

    def _run(self, open_state: Callable[[], State], close: bool = True) -> PassSummary:
        """One PassRun on the state `open_state` gives; PassFailed when it
        could not complete (its cause: what went wrong)."""
        try:
            state = open_state()
        except sqlite3.DatabaseError as e:
            raise PassFailed(f"state database: {e}", PassSummary()) from e
        with contextlib.closing(state) if close else contextlib.nullcontext(state):
            run: PassRun | None = None
            try:  # the first reads of the file (its checkpoint, hosts) may be the ones to find it damaged
                run = PassRun(self.context, state, self._full(state))
                try:
                    try:
                        run.run()
                    except StopRequested:
                        run.stop()
                    if not run.summary.interrupted and not self.context.dry_run:
                        run.remember()
                except (LockTimeout, OSError, WorkerDied) as e:
                    raise PassFailed(_describe(e, self.cfg), self._counted(state, run)) from e
                return self._counted(state, run)
            except sqlite3.DatabaseError as e:  # the counts so far: rows appended before it are said
                raise PassFailed(f"state database: {e}", PassSummary() if run is None else run.summary) from e

    def _counted(self, state: State, run: PassRun) -> PassSummary:
        """The pass's summary, with what the state now knows: the index's
        bad lines, and the orphan counts of the last full pass."""
        cp = state.keys.checkpoint(state.last)
        run.summary.bad_index_lines = 0 if cp is None else cp.bad_lines
        self.orphans = state.records.orphans()
        return run.summary


def _describe(error: BaseException, cfg: Config) -> str:
    if isinstance(error, LockTimeout):
        return f"{error} (the receiver or another reconciler holds it)"
    if isinstance(error, IndexWriteError):
        return f"appending to {cfg.index}: {error}"
    if isinstance(error, OSError):
        where = error.filename or cfg.index
        return f"{where}: {error.strerror or error}"
    return str(error)
