"""Scanning the episodes store: which files are tarballs we may index.

Layout: ``<root>/<host_id>/<episode_id>.tar.zst``. The root itself is the
operator's choice and may be a symlink; nothing below it is followed. Every
open below the root is an openat() relative to a directory fd with
O_NOFOLLOW, so a symlink planted before a pass or swapped in during one is
never followed and nothing outside the root is opened. Non-regular files are
recognised by lstat, and again by fstat after an O_NONBLOCK open, so a FIFO
named like a tarball never blocks a pass.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path
from typing import NamedTuple

from . import syscalls

SUFFIX = ".tar.zst"
_TEMP_SUFFIXES = (".tmp", ".partial")
# control characters (C0, DEL, C1), path separators, and the surrogates that
# os.fsdecode produces for bytes that are not UTF-8
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\\\ud800-\udfff]")


def is_safe_name(name: str) -> bool:
    """A host_id or episode_id we are willing to put in a row."""
    return bool(name) and not name.startswith(".") and not _UNSAFE.search(name)


class Passed(NamedTuple):
    """Why a pass passes over a name without opening it; `warned`: it says
    so (store_entry_skipped), else it is silent (the receiver's or the
    filesystem's business, no host's)."""

    reason: str
    warned: bool = False


_DOT = Passed("a dot-name: the receiver's business")
_TEMP = Passed("a temporary name: the receiver's business")
_NOT_TARBALL = Passed(f"not named <episode_id>{SUFFIX}")
# an episodes root that is a mount point has mkfs's, which the service's user
# cannot open (a warning every pass, a status never clean); hostnames have no "+"
_LOST_FOUND = Passed("lost+found: the filesystem's, no host's")
_UNSAFE_HOST = Passed("unsafe host name", warned=True)
_UNSAFE_EPISODE = Passed("unsafe episode name", warned=True)


def passed_host(name: str) -> Passed | None:
    """Why a pass does not visit this entry of the episodes root, or None.
    The one rule: the listing and `check` both ask it."""
    if name.startswith("."):
        return _DOT
    if name == "lost+found":
        return _LOST_FOUND
    return None if is_safe_name(name) else _UNSAFE_HOST


def passed_file(name: str) -> Passed | None:
    """Why a pass does not look at this name in a host directory, or None."""
    if name.startswith("."):
        return _DOT
    if name.endswith(_TEMP_SUFFIXES):
        return _TEMP
    if not name.endswith(SUFFIX):
        return _NOT_TARBALL
    return None if is_safe_name(name[: -len(SUFFIX)]) else _UNSAFE_EPISODE


def printable(name: str) -> str:
    """A file name for a log line: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class Tarball(NamedTuple):
    """A regular file named like an episode tarball, as lstat saw it."""

    host_id: str
    episode_id: str
    size: int
    mtime_ns: int
    ctime_ns: int
    dev: int
    ino: int

    @property
    def name(self) -> str:
        return self.episode_id + SUFFIX

    @property
    def path(self) -> str:
        return f"{self.host_id}/{self.name}"

    def age_s(self) -> float:
        """Seconds since the file last changed: its ctime, which a writer
        cannot set back (utime sets mtime; any write, rename or chmod moves
        ctime to now). The one age min_age and quarantine_min_age are
        compared with."""
        return (time.time_ns() - self.ctime_ns) / 1e9

    def is_file(self, st: os.stat_result) -> bool:
        """`st` is of this very file as scanned: same inode, size and mtime
        (a rename moves its ctime: see unchanged)."""
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
        )

    def unchanged(self, st: os.stat_result) -> bool:
        """is_file, and nothing done to it since: the same ctime too, which a
        rewrite that puts the mtime back (rsync --inplace -t) still moves. A
        chmod moves it as well; the file is then only looked at again."""
        return self.is_file(st) and st.st_ctime_ns == self.ctime_ns


class Skipped(NamedTuple):
    """Something in the store that looks like it matters but is never opened."""

    path: str  # relative to the root, printable
    reason: str
    unreadable: bool = False  # not stat'ed or opened (EACCES, EIO): what it holds, nobody knows


class NotRegularFile(OSError):
    """What was opened is not the regular file that was scanned."""


_KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFLNK: "symlink",
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "unknown file type")


class HostDir:
    """One host directory, held open by fd for the time it is processed."""

    def __init__(self, host_id: str, fd: int) -> None:
        self.host_id = host_id
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> HostDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def entries(self) -> tuple[list[str], list[Skipped]]:
        """Episode ids named here, sorted, and the names skipped as unsafe;
        the rest passed_file passes over silently."""
        names: list[str] = []
        skipped: list[Skipped] = []
        for name in sorted(os.listdir(self.fd)):
            passed = passed_file(name)
            if passed is None:
                names.append(name[: -len(SUFFIX)])
            elif passed.warned:
                skipped.append(Skipped(f"{self.host_id}/{printable(name)}", passed.reason))
        return names, skipped

    def unlistable(self, e: OSError) -> Skipped:
        """This directory, when stat'ing or listing it failed (EIO): what it
        holds, nobody knows, so its rows are not missing (scan, survey)."""
        return Skipped(self.host_id, f"cannot list: {e.strerror}", True)

    def lstat(self, episode_id: str) -> Tarball | Skipped | None:
        """The tarball as it is now; None when it is gone, Skipped when it
        cannot be looked at (a directory listed but not searchable, EIO)."""
        try:
            st = os.stat(episode_id + SUFFIX, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            return Skipped(f"{self.host_id}/{episode_id}{SUFFIX}", f"cannot stat: {e.strerror}", True)
        if not stat.S_ISREG(st.st_mode):
            return Skipped(f"{self.host_id}/{episode_id}{SUFFIX}", _kind(st.st_mode))
        return Tarball(
            self.host_id, episode_id, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino
        )

    def moved(self, tarball: Tarball) -> str | None:
        """Why what was read from the fd `open(tarball)` gave may not be
        `tarball` as scanned (the bytes may be half of one file and half of
        another), or None. The one test of "changed while it was read", for
        verifying and scrubbing. One lstat, after the read, tells both: open
        checked that the fd is the scanned inode, so when the name still
        leads to that inode, its size and times are the fd's (an fstat too
        cost 2 us of 130 on a 64 KiB tarball)."""
        try:
            st = os.stat(tarball.name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:  # gone, or no longer to be looked at
            return "replaced while it was read"
        if (st.st_dev, st.st_ino) != (tarball.dev, tarball.ino):  # the scanned inode: a regular file still
            return "replaced while it was read"  # first: the old file's unlinking moved its ctime too
        if not tarball.unchanged(st):
            return "changed while it was read"
        return None

    def open(self, tarball: Tarball) -> int:
        """Open the scanned file for reading without following links or
        blocking; raises NotRegularFile if what is there is not that file
        (ELOOP: the bare name is a symlink now, put there since the scan's
        lstat: a file replaced while we looked, not one we cannot read)."""
        try:
            fd = os.open(tarball.name, syscalls.O_NOFOLLOW_READ, dir_fd=self.fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            why = "replaced by a symlink since it was scanned"
            raise NotRegularFile(errno.ELOOP, why, tarball.path) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (tarball.dev, tarball.ino):
            os.close(fd)
            raise NotRegularFile(errno.ESTALE, "replaced since it was scanned", tarball.path)
        return fd


class Store:
    """The episodes root, held open by fd for the length of a pass."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_ids(self, only: str | None = None) -> list[str | Skipped]:
        """Host directory names to visit, sorted; Skipped for unsafe names;
        the rest passed_host passes over silently (dot-names, lost+found)."""
        if only is not None:
            return [only]
        out: list[str | Skipped] = []
        for name in sorted(os.listdir(self.fd)):
            passed = passed_host(name)
            if passed is None:
                out.append(name)
            elif passed.warned:
                out.append(Skipped(printable(name), passed.reason))
        return out

    def open_host(self, host_id: str) -> HostDir | Skipped | None:
        """The host directory, Skipped when it is a symlink or not a directory
        (or unreadable, when it cannot be opened: EACCES, EIO), None when it
        does not exist (removed mid-pass, or --host names nothing)."""
        try:
            return HostDir(host_id, os.open(host_id, syscalls.O_DIRECTORY_NOFOLLOW, dir_fd=self.fd))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                return Skipped(host_id, f"cannot open: {e.strerror}", True)
        try:  # O_DIRECTORY|O_NOFOLLOW fails with ENOTDIR or ELOOP on a symlink: say which
            st = os.stat(host_id, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return Skipped(host_id, "host directory is a symlink")
        return Skipped(host_id, f"not a directory ({_kind(st.st_mode)})")
