"""Where the state database lives, and how each kind of caller opens it.
Who may write what, and the races that rule handles, is the state package's
docstring; this module is how the rule is followed.

- `owned`: a pass with a state directory. It holds the directory's flock for
  the whole pass, so it alone creates, migrates, rebuilds or deletes files
  there; a second pass waits up to lock_timeout, then gives up (StateBusy).
- `guest`: scrub and the outcome sinks, which may run at any time beside a
  pass. They write only in short transactions on a database that exists and
  has this program's schema; for anything more (none yet, an older schema,
  a damaged file) they take the directory's lock, like a pass, for as long
  as that takes (`guest(..., settle=True)`).
- `view`: status, check and dry runs write nothing of ours: a temporary
  database with the state database attached read-only, so only the index's
  rows since the last pass are read into the temporary one.
- `TempState`: a pass without a state directory (by hand), or one whose
  directory cannot be written, keeps a database under $TMPDIR that nobody
  else opens, removed when the process ends: every such pass reads the whole
  index.

A file that cannot be used (damaged, truncated, another schema, another
store) is removed and rebuilt by its owner, with a warning. The state files
of earlier versions (state.bin, last_pass.json, scrub.json) are removed by
the first pass that succeeds with the database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import lock, syscalls
from .config import Config
from .log import Logger
from .state import FILE_NAME, Access, State, StateUnusable

OLD_FILES = ("state.bin", "last_pass.json", "scrub.json")


class StateBusy(Exception):
    """Another pass holds the state directory."""


@contextmanager
def locked_dir(path: Path, timeout: float, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on the directory itself (no lock file to go
    stale; the kernel drops it when the process dies). Raises StateBusy."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            lock.poll(lambda: syscalls.try_flock(fd) or None, timeout, on_wait)
        except lock.LockTimeout:
            raise StateBusy(f"another pass holds the state directory {path} (waited {timeout:g} s)") from None
        yield
    finally:
        os.close(fd)


def open_state(path: Path, cfg: Config, log: Logger) -> State:
    """The database at `path` for its owner: a new one in its place when it
    cannot be used."""
    try:
        return State.open(path, str(cfg.episodes_root), str(cfg.index))
    except StateUnusable as e:
        log.warning("state_rebuilt", state_file=path, reason=str(e))
        discard(path)
        return State.open(path, str(cfg.episodes_root), str(cfg.index))


def discard(path: Path) -> None:
    """Remove a state database with its WAL and shared memory (its owner only)."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def database(cfg: Config) -> Path:
    assert cfg.state_dir is not None
    return cfg.state_dir / FILE_NAME


@contextmanager
def owned(cfg: Config, log: Logger, on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold the state directory for as long as the block runs; yields where
    the database is (open it with open_state). Raises StateBusy."""
    assert cfg.state_dir is not None
    with locked_dir(cfg.state_dir, cfg.lock_timeout, on_wait):
        yield database(cfg)


def guest(cfg: Config, log: Logger, settle: bool = False, on_wait: Callable[[], None] | None = None) -> State:
    """The state database for short transactions beside a running pass.
    Raises StateUnusable when there is no usable database of this schema,
    unless `settle`: then, holding the directory like a pass (StateBusy if
    one holds it past lock_timeout), the database is made usable first.
    on_wait is called while a pass holds it: it may raise, so that a stop
    ends the wait and not lock_timeout."""
    path = database(cfg)
    try:
        return State.open(path, str(cfg.episodes_root), str(cfg.index), Access.GUEST)
    except StateUnusable:
        if not settle:
            raise
    with owned(cfg, log, on_wait):
        open_state(path, cfg, log).close()
    return State.open(path, str(cfg.episodes_root), str(cfg.index), Access.GUEST)


class TempState:
    """A temporary directory for a database nobody keeps; removed on close."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cis490-reconcile-"))
        self.path = self.dir / FILE_NAME

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def view(cfg: Config, log: Logger, with_state: bool = True) -> Iterator[State]:
    """A writable temporary database with the state database (if there is a
    usable one, and `with_state`) attached read-only as its base; removed
    afterwards."""
    temp = TempState()
    try:
        state = State.open(temp.path, str(cfg.episodes_root), str(cfg.index))
        try:
            base = None if cfg.state_dir is None or not with_state else database(cfg)
            try:
                # exists() raises PermissionError in a directory this user may not search
                if base is not None and base.exists():
                    State.open(base, str(cfg.episodes_root), str(cfg.index), Access.READER).close()
                    state.attach_base(base)
                    state.keys.copy_hosts_from_base()
            except (OSError, StateUnusable, sqlite3.Error) as e:  # replaced since its check, say
                state.forget_base()
                state.base_ignored = str(e)
                log.info("state_ignored", state_file=base, reason=str(e))
            yield state
        finally:
            state.close()
    finally:
        temp.close()


def writable(directory: Path) -> str | None:
    """Why a pass cannot keep its state in `directory`, or None."""
    if (why := syscalls.not_a_directory(directory)) is not None:
        return why
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None


def remove_old_files(directory: Path, log: Logger) -> None:
    """The files of earlier versions, replaced by the database (its owner only)."""
    for name in OLD_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            log.info("state_file_removed", path=directory / name, reason="replaced by the state database")
