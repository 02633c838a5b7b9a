"""Where the state database lives, and who may write it.

- A pass with a state directory opens ``<state_dir>/state.sqlite3`` after
  taking an exclusive flock on the directory, so two passes (the timer's and
  one started by hand) never interleave their writes: the second waits up to
  lock_timeout, then fails with one line. Status and scrub take no such lock.
- Without a state directory (a pass by hand), or when it cannot be written,
  the pass uses a temporary database under $TMPDIR, removed when the process
  ends: memory stays flat, and every such pass reads the whole index.
- Status and dry runs write nothing of ours: they open a temporary database
  and attach the state database read-only, so only the index's rows since the
  last pass are read into the temporary one.
- A file that cannot be used (damaged, truncated, another schema, another
  store) is removed and rebuilt by a full pass, with a warning. The state
  files of earlier versions (state.bin, last_pass.json, scrub.json) are
  removed after the first pass (or scrub) that succeeds without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import state, syscalls
from .config import Config
from .log import Logger
from .state import State, StateUnusable

OLD_FILES = ("state.bin", "last_pass.json")
_POLL_S = 0.05


class StateBusy(Exception):
    """Another pass holds the state directory."""


@contextmanager
def locked_dir(path: Path, timeout: float, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive flock on the directory itself (no lock file to go
    stale; the kernel drops it when the process dies)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while not syscalls.try_flock(fd):
            if time.monotonic() >= deadline:
                raise StateBusy(f"another pass holds the state directory {path} (waited {timeout:g} s)")
            on_wait()
            time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)


def open_state(path: Path, cfg: Config, log: Logger, readonly: bool = False) -> State:
    """The state database at `path`, a new one in its place when it cannot
    be used (not for `readonly`: then StateUnusable goes to the caller)."""
    try:
        return State.open(path, str(cfg.episodes_root), str(cfg.index), readonly)
    except StateUnusable as e:
        if readonly:
            raise
        log.warning("state_rebuilt", state_file=path, reason=str(e))
        discard(path)
        return State.open(path, str(cfg.episodes_root), str(cfg.index))


def discard(path: Path) -> None:
    """Remove a state database with its WAL and shared memory."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


class TempState:
    """A temporary directory for a database nobody keeps; removed on close."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cis490-reconcile-"))
        self.path = self.dir / state.FILE_NAME

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def open_view(cfg: Config, log: Logger, temp: TempState) -> State:
    """A writable temporary database with the state database (if there is a
    usable one) attached read-only as its base."""
    view = State.open(temp.path, str(cfg.episodes_root), str(cfg.index))
    base = None if cfg.state_dir is None else cfg.state_dir / state.FILE_NAME
    if base is None or not base.exists():
        return view
    try:
        State.open(base, str(cfg.episodes_root), str(cfg.index), readonly=True).close()
        view.attach_base(base)
        view.keys.copy_hosts_from_base()
    except (StateUnusable, sqlite3.Error) as e:
        log.info("state_ignored", state_file=base, reason=str(e))
    return view


def writable(directory: Path) -> str | None:
    """Why a pass cannot keep its state in `directory`, or None."""
    if not directory.is_dir():
        return "not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None


def remove_old_files(directory: Path, names: tuple[str, ...], log: Logger) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            log.info("state_file_removed", path=directory / name, reason="replaced by the state database")
