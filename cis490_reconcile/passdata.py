"""What one pass is given (PassContext) and what it counts (PassSummary):
the records reconcile.py, passrun.py and scan.py share. pass_finished,
pass_failed, the metrics and the last pass's record are the summary's
fields. WorkerDied: how a pass ends when a verifying process is gone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TextIO

from .config import Config
from .log import Logger
from .notify import Notifier
from .termbar import TerminalBar
from .verdicts import Decoding


class WorkerDied(Exception):
    """A verifying worker process died (SIGKILL, the OOM killer of a
    MemoryMax= cgroup), mid-batch or idle: a batch it held has no verdicts.
    The pass commits what was verified and fails (pass_failed); the next
    pass reads the rest again."""

    def __init__(self, reason: str = "a verifying worker died (a signal, or out of memory)") -> None:
        super().__init__(reason)


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
    full: bool = False  # listed every host directory and read the whole index
    hosts_listed: int = 0
    hosts_unchanged: int = 0  # not listed: unchanged since the last pass


class PassContext(NamedTuple):
    """What a pass needs from the long-lived Reconciler."""

    cfg: Config
    log: Logger
    notifier: Notifier
    should_stop: Callable[[], bool]
    decoding: Decoding
    workers: int
    dry_run: bool = False
    rows_out: TextIO | None = None
    bar: TerminalBar | None = None
