"""The advisory lock shared with the receiver, and the races it handles.

The receiver appends to index.jsonl under a lock of *its* choosing, and Linux
has lock families that do not see each other (tests/test_lock.py holds each
family in a real process and tries the others): flock()
locks conflict only with flock(); POSIX record locks (fcntl F_SETLK,
lockf) and OFD record locks (F_OFD_SETLK) conflict with each other but not
with flock(). A lock of the wrong family fails silently: both sides "hold" it.

What we do, and the race each step closes:

1. We take BOTH an OFD record lock and a flock on the same open file
   description, so we exclude a receiver that uses flock, lockf/fcntl or OFD
   locks. The record lock covers the whole file (start 0, length 0 = to
   infinity), so it overlaps whatever range a lockf() caller locks, including
   lockf(F_LOCK, 0) taken at end of file.

2. OFD, not classic POSIX locks, for our record lock. A POSIX lock belongs to
   the (process, inode) pair and is dropped when the process closes ANY fd of
   that file - a second fd opened to read the tail, or one a library opens
   behind our back. POSIX locks also do not exclude threads of one process.
   OFD locks belong to the open file description: they survive closing other
   fds, and conflict with other processes' POSIX locks as the kernel keeps both
   in one table. flock also belongs to the open file description.

3. Always the same order: OFD first, then flock. Two reconcilers therefore
   cannot deadlock: whoever holds the OFD lock is the only one of us that can
   be waiting for the flock, and nobody else waits for the OFD lock while
   holding the flock. A receiver uses one family and never waits for the
   other, so no cycle involves it either.

4. A timeout by polling non-blocking attempts with capped exponential backoff.
   F_OFD_SETLKW and flock(LOCK_EX) block without a deadline, and a SIGALRM
   timeout would claim the process's signal handling. Polling also lets the
   caller ping the systemd watchdog and update STATUS while it waits. The cost
   is fairness: a waiter can lose a race to a receiver that re-locks at once.
   The backoff is capped at 25 ms, so any pause of the receiver lets us in,
   and the deadline turns starvation into a clear error instead of a hang.

5. The file is replaced while we wait (unlinked and recreated, or renamed
   over): we would hold a lock on an inode nobody else uses. Once both locks
   are held we compare fstat(fd) with stat(path); if they differ we release,
   reopen the path and try again within the same deadline.

6. Crash or kill -9: the kernel releases OFD and flock locks when the last fd
   of the open file description closes. No lock file is left "held", there
   is no PID file to go stale, and nothing to clean up.

7. fork: a child shares the open file description and so would share the
   locks. The fd is O_CLOEXEC; one fork happens under the lock (the last
   commit attempt on an index replaced every time rebuilds it there, maybe
   with a forked reader), and it is harmless: release is an explicit unlock
   of the description (8), which drops the lock for the child too, and the
   child dies with its parent.

8. Release is explicit, in reverse order (flock, then OFD), before the close,
   so the lock is never held longer than the critical section even if some
   other reference to the open file description lingers.

None of this holds on a network, cluster or FUSE filesystem: on NFS flock is
emulated with POSIX locks and O_APPEND is not atomic across clients; a FUSE
daemon may keep locks in this kernel only, on its own inode (bindfs does: a
lock on the file it serves does not stop ours, tests/test_network_fs.py).
So a pass refuses such an index, lock file, store or state directory at
start-up (preflight.network_filesystems, by statfs magic: fstypes.py);
allow_network_fs runs it anyway, at the risk of rows appended twice or glued
together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from . import syscalls

_T = TypeVar("_T")
_BACKOFF_START_S = 0.001
_BACKOFF_MAX_S = 0.025


class LockTimeout(Exception):
    """The lock could not be taken before the deadline."""


def _try_both(fd: int) -> bool:
    if not syscalls.try_ofd_lock(fd):
        return False
    if syscalls.try_flock(fd):
        return True
    syscalls.ofd_unlock(fd)  # never sit on one family while waiting for the other
    return False


def _release(fd: int) -> None:
    syscalls.flock_unlock(fd)
    syscalls.ofd_unlock(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def poll(attempt: Callable[[], _T | None], timeout: float, on_wait: Callable[[], None] | None = None) -> _T:
    """Call attempt() until it returns something, sleeping with capped
    exponential backoff in between (race 4) and calling on_wait at each
    wait; LockTimeout once `timeout` has passed. Every lock of ours waits
    this way: the index lock here, the state directory's in statedir.py."""
    deadline = time.monotonic() + timeout
    backoff = _BACKOFF_START_S
    while (got := attempt()) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LockTimeout(f"waited {timeout:g} s")
        if on_wait is not None:
            on_wait()
        time.sleep(min(backoff, remaining))
        backoff = min(backoff * 2, _BACKOFF_MAX_S)
    return got


@contextmanager
def hold(
    path: Path,
    flags: int,
    timeout: float,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Open `path` with `flags` (must include write access), hold both locks,
    yield the fd; release and close on exit. Raises LockTimeout."""

    def attempt() -> int | None:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            locked = _try_both(fd)
            if locked and _same_file(fd, path):
                return fd
            if locked:
                _release(fd)  # race 5: we locked a file that is no longer at `path`
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    try:
        fd = poll(attempt, timeout, on_wait)
    except LockTimeout:
        raise LockTimeout(f"could not lock {path} within {timeout:g} s") from None
    try:
        yield fd
    finally:
        try:
            _release(fd)
        finally:
            os.close(fd)
