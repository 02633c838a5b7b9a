"""Where the outcome of a run (a pass, or a scrub run) goes: one interface,
two sinks, used the same way by both commands.

A run ends in an Outcome: what ran, when, how it ended, its counts. Each
sink keeps it where an operator looks:

- MetricsFile: the node_exporter textfile. A pass writes metrics_file, a
  scrub `<stem>_scrub.prom` beside it, so neither overwrites the other. The
  time of the last success is carried forward unchanged through failures,
  and across processes (read back from the file the last one wrote).
- StateRecord: the record "last_pass" or "last_scrub" in the state database,
  which `status` shows (its only writer).

A pass that gave up (or was stopped) waiting for another to release the state
directory goes to no sink: it changed nothing, and the record and metrics are
the running one's.
A sink that cannot write says so (metrics_write_failed, state_record_failed)
and the run's exit status stands: a full metrics disk must not fail a pass
that did its job.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

from . import statedir
from .basics import iso_utc
from .config import Config
from .log import Logger
from .state import StateUnusable


class Outcome(NamedTuple):
    command: str  # "pass" or "scrub"
    started_at: float  # unix seconds
    duration_s: float
    result: str  # "ok", "failed" or "interrupted"
    error: str | None
    counts: Mapping[str, object]  # the pass_finished / scrub_finished facts

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    def record(self) -> dict[str, object]:
        return {
            "started_at": iso_utc(int(self.started_at * 1e9)),
            "result": self.result,
            "error": self.error,
            **self.counts,
        }


class Sink(Protocol):
    def write(self, outcome: Outcome) -> None: ...


class MetricsFile:
    """The textfile of one command; remembers the last success across runs."""

    def __init__(self, path: Path, log: Logger) -> None:
        self.path = path
        self.log = log
        self._last_success: float | None = None
        self._read_back = False

    def _target(self, outcome: Outcome) -> Path:
        if outcome.command == "scrub":
            return self.path.with_name(f"{self.path.stem}_scrub.prom")
        return self.path

    def write(self, outcome: Outcome) -> None:
        from . import metrics  # prometheus_client costs 23 ms of start-up: only when asked for

        path = self._target(outcome)
        if outcome.command == "pass":
            if not self._read_back:
                self._last_success, self._read_back = metrics.last_success(path), True
            if outcome.ok:
                self._last_success = outcome.started_at
            data = metrics.render_pass(outcome, self._last_success)
        else:
            data = metrics.render_scrub(outcome)
        try:
            metrics.write(path, data)
        except OSError as e:
            self.log.warning("metrics_write_failed", metrics_file=path, error=e.strerror or str(e))


class StateRecord:
    """The records `status` reads, "last_pass" and "last_scrub": their one
    writer. A guest of the state database (statedir.guest): one short
    transaction, which cannot disturb a pass running meanwhile, on a
    database a pass (or the scrub) has already made."""

    def __init__(self, cfg: Config, log: Logger) -> None:
        self.cfg = cfg
        self.log = log

    def write(self, outcome: Outcome) -> None:
        state_dir = self.cfg.state_dir
        if state_dir is None or statedir.writable(state_dir) is not None:
            return
        try:
            with contextlib.closing(statedir.guest(self.cfg, self.log)) as state, state.transaction():
                state.records.save(f"last_{outcome.command}", outcome.record())
        except (OSError, sqlite3.Error, StateUnusable) as e:
            self.log.warning("state_record_failed", state_dir=state_dir, error=str(e))


def sinks(cfg: Config, log: Logger) -> list[Sink]:
    found: list[Sink] = [StateRecord(cfg, log)]
    if cfg.metrics_file is not None:
        found.append(MetricsFile(cfg.metrics_file, log))
    return found
