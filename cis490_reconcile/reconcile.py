"""Running passes: what lasts from one pass to the next.

A Reconciler is made once per process (per configuration, in a loop) with
the decoding limits and worker count its memory plan allows. Each run_pass
opens the state database for that pass (statedir.py: locked, temporary, or
a read-only view for a dry run) and runs a PassRun on it, which holds
everything that belongs to one pass. The pass_started / pass_finished (or
pass_failed) events and the last pass's record come from here.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from . import statedir
from .config import Config
from .index import IndexWriteError
from .lock import LockTimeout
from .log import Logger
from .notify import Notifier
from .passrun import PassContext, PassRun, PassSummary
from .runtime import StopRequested, iso_utc
from .state import FILE_NAME, State
from .statedir import StateBusy, TempState
from .termbar import TerminalBar
from .verdicts import decoding_for


class PassFailed(Exception):
    """The pass could not complete (lock timeout, index unwritable, disk full)."""

    def __init__(self, reason: str, summary: PassSummary) -> None:
        super().__init__(reason)
        self.summary = summary


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


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
        wanted = cfg.workers or default_workers()
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
        self._temp: TempState | None = None  # the database of a process that keeps none
        self._kept_in: Path | None = None  # the state directory of the pass under way, if it keeps one

    def close(self) -> None:
        if self._temp is not None:
            self._temp.close()
            self._temp = None

    def __enter__(self) -> Reconciler:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the state database of one pass -------------------------------------------------

    def _temp_path(self) -> TempState:
        if self._temp is None:
            self._temp = TempState()
        return self._temp

    @contextmanager
    def _state(self) -> Iterator[State]:
        ctx = self.context
        if ctx.dry_run:  # write nothing of ours either: a view
            temp = TempState()
            view = statedir.open_view(self.cfg, self.log, temp)
            try:
                yield view
            finally:
                view.close()
                temp.close()
            return
        state_dir = self.cfg.state_dir
        problem = None if state_dir is None else statedir.writable(state_dir)
        if state_dir is None or problem is not None:
            if problem is not None:
                self.log.warning("state_dir_unusable", state_dir=state_dir, reason=problem)
            temp = self._temp_path()
            state = statedir.open_state(temp.path, self.cfg, self.log)
            try:
                yield state
            finally:
                state.close()
            return
        with statedir.locked_dir(state_dir, self.cfg.lock_timeout, ctx.notifier.keepalive):
            state = statedir.open_state(state_dir / FILE_NAME, self.cfg, self.log)
            try:
                self._kept_in = state_dir
                yield state
            finally:
                self._kept_in = None
                state.close()

    def _full(self, state: State) -> bool:
        every, cp = self.cfg.full_every, state.keys.checkpoint(state.last)
        due = cp is None or (every is not None and time.time() - cp.rebuilt_at >= every)
        return self.force_full or due

    # --- a pass -------------------------------------------------------------------------

    def run_pass(self) -> PassSummary:
        """One pass. Raises PassFailed; the summary event is logged either way.
        After a stop request it returns early with summary.interrupted set."""
        ctx = self.context
        started, started_ns = time.monotonic(), time.time_ns()
        ctx.log.info(
            "pass_started",
            episodes_root=self.cfg.episodes_root,
            index=self.cfg.index,
            host=self.cfg.host,
            min_age_s=self.cfg.min_age,
            max_read_rate=self.cfg.max_read_rate,
            dry_run=ctx.dry_run,
        )
        summary = PassSummary()
        for attempt in (1, 2):
            try:
                summary = self._run(started_ns)
                break
            except sqlite3.DatabaseError as e:
                if not _damaged(e) or attempt == 2 or self.cfg.state_dir is None:
                    summary.duration_s = round(time.monotonic() - started, 3)
                    raise self._failed(f"state database: {e}", summary) from e
                self.log.warning("state_rebuilt", state_dir=self.cfg.state_dir, reason=str(e))
                statedir.discard(self.cfg.state_dir / FILE_NAME)
            except StateBusy as e:
                raise self._failed(str(e), summary) from e
            except _Failed as e:
                e.summary.duration_s = round(time.monotonic() - started, 3)
                raise self._failed(e.reason, e.summary) from e.__cause__
        summary.duration_s = round(time.monotonic() - started, 3)
        if ctx.bar is not None:
            ctx.bar.clear()
        ctx.log.info("pass_finished", dry_run=ctx.dry_run, **asdict(summary))
        return summary

    def _failed(self, reason: str, summary: PassSummary) -> PassFailed:
        self.log.error("pass_failed", error=reason, **asdict(summary))
        return PassFailed(reason, summary)

    def _run(self, started_ns: int) -> PassSummary:
        ctx = self.context
        with self._state() as state:
            run = PassRun(ctx, state, self._full(state))
            try:
                try:
                    run.run()
                except StopRequested:
                    run.stop()
            except (LockTimeout, OSError) as e:
                reason = _describe(e, self.cfg)
                self._save_record(state, run, started_ns, "failed", reason)
                self.orphans = state.records.orphans()
                raise _Failed(reason, run.summary) from e
            if not run.summary.interrupted and not ctx.dry_run:
                run.remember()
                if self._kept_in is not None:  # the first good pass with the database retires the old files
                    statedir.remove_old_files(self._kept_in, statedir.OLD_FILES, self.log)
            self._save_record(state, run, started_ns, "interrupted" if run.summary.interrupted else "ok")
            self.orphans = state.records.orphans()
            return run.summary

    def _save_record(
        self, state: State, run: PassRun, started_ns: int, result: str, error: str | None = None
    ) -> None:
        """The last pass's record, for status (not for a dry run: it writes nothing)."""
        cp = state.keys.checkpoint(state.last)
        run.summary.bad_index_lines = 0 if cp is None else cp.bad_lines
        if self.context.dry_run:
            return
        record = {"started_at": iso_utc(started_ns), "result": result, "error": error, **asdict(run.summary)}
        with state.transaction():
            state.records.save("last_pass", record)


class _Failed(Exception):
    def __init__(self, reason: str, summary: PassSummary) -> None:
        super().__init__(reason)
        self.reason, self.summary = reason, summary


def _damaged(error: sqlite3.DatabaseError) -> bool:
    """The state file is damaged (found mid-pass): "malformed", "not a
    database", or a header that forbids writing. Not a busy or full disk."""
    return type(error) is sqlite3.DatabaseError or "readonly database" in str(error)


def _describe(error: BaseException, cfg: Config) -> str:
    if isinstance(error, LockTimeout):
        return f"{error} (the receiver or another reconciler holds it)"
    if isinstance(error, StateBusy):
        return str(error)
    if isinstance(error, IndexWriteError):
        return f"appending to {cfg.index}: {error}"
    if isinstance(error, OSError):
        where = error.filename or cfg.index
        return f"{where}: {error.strerror or error}"
    return str(error)
