"""Every platform syscall the reconciler depends on, in one place.

Locks, durability, page-cache hints and forked helper processes (which must
die with the pass and leave no copy of its locked file descriptors) are where
Linux semantics matter and where Python's standard library is thin (there is
no wrapper for OFD locks).
Keeping them here means the rest of the code reads as policy, and a port or an
audit starts and ends in this file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import select
import signal
import stat
import struct
from collections.abc import Callable
from pathlib import Path

# Flags for opening anything below the episodes root: never follow a symlink,
# never block on a FIFO, never acquire a controlling terminal, never leak into
# a child process.
O_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
O_DIRECTORY_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# struct flock on Linux (x86_64 and aarch64): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid, padded to 32 bytes. l_pid must be 0
# for OFD locks. Start 0 / length 0 covers the whole file, so it conflicts
# with any record lock the receiver takes, wherever its range starts.
_FLOCK_STRUCT = struct.Struct("hhqqi4x")
_WOULD_BLOCK = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _ofd(fd: int, lock_type: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK_STRUCT.pack(lock_type, os.SEEK_SET, 0, 0, 0))


def try_ofd_lock(fd: int) -> bool:
    """Try to take an exclusive whole-file OFD lock; False if someone holds a
    conflicting OFD or POSIX (fcntl/lockf) lock. The fd must be open for writing."""
    try:
        _ofd(fd, fcntl.F_WRLCK)
    except OSError as e:
        if e.errno in _WOULD_BLOCK:
            return False
        raise
    return True


def ofd_unlock(fd: int) -> None:
    _ofd(fd, fcntl.F_UNLCK)


def try_flock(fd: int) -> bool:
    """Try to take an exclusive flock; False if another open file description holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in _WOULD_BLOCK:
            return False
        raise
    return True


def flock_unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


def fdatasync(fd: int) -> None:
    os.fdatasync(fd)


def fsync_dir(path: str | os.PathLike[str] | int) -> None:
    """Make a rename or a file creation in `path` (or an open directory fd) durable."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the
    new one, never a mix: temp file, fsync, rename, fsync the directory.
    The file is 0640 less the umask, or exactly `mode` when given (a file
    another user's daemon must read, whatever the unit's UMask=). The temp
    name is predictable, in a directory others may write (node_exporter's):
    whatever is there (a crashed run's file, a symlink planted to have the
    index truncated) is unlinked, never followed, and the file is created
    anew (O_EXCL: one planted again meanwhile fails the write, harmlessly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def discard_output(fd: int) -> None:
    """From now on, what is written to `fd` goes to /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """The regular file at `path` (or a symlink to one) opened to read, and
    its fstat; OSError "not a regular file" for anything else. Opened
    non-blocking, then fstat: a FIFO nobody writes would block open()
    forever, a device such as /dev/zero be read forever. For files we only
    read whole or by offset (the index, a config file), which a preflight
    check may have seen regular before they were replaced."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path` (open_regular), when there
    are at most `limit`; ValueError when there are more."""
    fd, _ = open_regular(path)
    try:
        data = pread_exact(fd, limit + 1, 0)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


NO_DIRECTORY = ("no such directory", "not a directory")  # nothing there; something else there


def not_a_directory(path: Path) -> str | None:
    """Why `path` is not a directory this user can reach: one of NO_DIRECTORY
    (nothing there; something else, or a file where a parent should be), or
    the error (EACCES: a parent this user may not search); None when it is
    one. Not Path.is_dir, which raises PermissionError there: that is a
    reason to say in one line, not a traceback."""
    nothing, something_else = NO_DIRECTORY
    try:
        return None if stat.S_ISDIR(os.stat(path).st_mode) else something_else
    except FileNotFoundError:
        return nothing
    except NotADirectoryError:
        return something_else
    except OSError as e:
        return e.strerror or str(e)


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Tell the kernel we will not read this range again, so a pass over the
    store does not push the receiver's working set out of the page cache."""
    with contextlib.suppress(OSError):  # advisory only; some filesystems refuse it
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14: preadv2 that never waits for the disk


def pread_cached(fd: int, length: int, offset: int) -> bytearray | None:
    """`length` bytes at `offset` when the page cache held every one of them
    already (a preadv2 with RWF_NOWAIT, which reads nothing from the disk),
    else None: some were not cached (EAGAIN, or a short read: the end of the
    file counts), or the filesystem cannot tell (EOPNOTSUPP: tmpfs, FUSE).
    Re-measure: read a file, then `python3 -c 'import os; fd = os.open(F,
    os.O_RDONLY); print(os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT))'`
    prints 4096 (ext4); after `dd if=F iflag=nocache count=0` (which
    drops it) the same raises EAGAIN."""
    if not _RWF_NOWAIT:
        return None
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError:  # not cached, no RWF_NOWAIT here, or a read error the plain read will report
        return None
    return buf if n == length else None


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """pread that loops over short reads (rare on local files, legal anyway)."""
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors
    (a unit's MemoryMax= lands there), in bytes; None when there is none.
    cgroup v2 (memory.max) or v1 (memory.limit_in_bytes, where "no limit" is
    a huge number). Re-measure with `systemd-run -p MemoryMax=300M --wait
    --pipe cat /proc/self/cgroup` and the memory.max file it names."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        here = Path(path)
        for directory in (here, *here.parents):
            with contextlib.suppress(OSError, ValueError):
                limits.append(int((base / directory.relative_to("/") / name).read_text()))
    real = [limit for limit in limits if 0 < limit < 1 << 60]  # v1 says 2**63-4096 for "none"
    return min(real, default=None)


def filesystem_type(path: Path) -> int:
    """statfs(2)'s f_type for the filesystem holding `path`: its magic number
    (linux/magic.h; `stat -f -c %t PATH` prints the same, in hex). f_type is
    the first field of struct statfs, a C long, on x86_64 and aarch64; the
    buffer is larger than the struct on any architecture."""
    import ctypes  # only at start-up: ~4 ms that a pass pays once

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_ulong.from_buffer(buf).value


def _mountinfo() -> list[str]:
    """The lines of /proc/self/mountinfo; none if it cannot be read."""
    try:
        with open("/proc/self/mountinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def mount_type(path: Path) -> str | None:
    """The type /proc/self/mountinfo gives the mount holding `path`, with a
    FUSE daemon's subtype (fuse.sshfs, fuse.glusterfs) where it set one;
    None if it cannot be told. Matched by device number (mountinfo's third
    field is major:minor; its type follows the " - " separator)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    for line in _mountinfo():
        fields, _, tail = line.partition(" - ")
        if fields.split(" ")[2:3] == [wanted] and tail:
            return tail.split(" ")[0]
    return None


def mount_id(path: Path) -> int | None:
    """The id /proc/self/mountinfo gives the mount holding `path`: the one
    whose mount point is the longest prefix of its real path, the last of
    those stacked on one point. rename(2) between two mounts fails with
    EXDEV even on one filesystem, with one st_dev (a bind mount: systemd
    makes one of each ReadWritePaths=/ReadOnlyPaths= entry). Re-measure:
    `mount --bind D D; mv D/f E/` says "Invalid cross-device link". None if
    it cannot be told."""
    real = os.path.realpath(path)
    found, longest = None, -1
    for line in _mountinfo():
        fields = line.split(" ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # \040 is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= longest:
            found, longest = int(fields[0]), len(point)
    return found


def cpu_count() -> int:
    """CPUs this process may run on: its affinity mask, which a unit's
    CPUAffinity= or a container narrows (os.cpu_count() would not see it)."""
    return len(os.sched_getaffinity(0))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this (forked) process when its parent dies,
    so a pass killed by the watchdog or by kill -9 leaves no workers behind
    (without a unit's cgroup to sweep them up, they would wait forever).
    Exits at once if the parent is already gone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # died before the prctl took effect
        os._exit(1)


class Child:
    """A forked process running one function, and a pipe each way."""

    def __init__(self, pid: int, fd: int, to_child: int) -> None:
        self.pid: int | None = pid
        self.fd = fd
        self.to_child = to_child

    def read(self, timeout_s: float) -> bytes | None:
        """What the child wrote next: b"" once it closed the pipe (it is
        done or dead), None if nothing came within timeout_s."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        return os.read(self.fd, 1 << 16) if ready else None

    def send(self, data: bytes) -> None:
        """Write to the child's input (a dead child: BrokenPipeError)."""
        view = memoryview(data)
        while view:
            view = view[os.write(self.to_child, view) :]

    def succeeded(self) -> bool:
        """Wait for it to exit; whether its function returned (exit 0)."""
        assert self.pid is not None
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return status == 0

    def close(self) -> None:
        """Kill it if it still runs, reap it and close the pipes: afterwards
        it holds no copy of our file descriptors (nor of the locks on them)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        os.close(self.fd)
        os.close(self.to_child)


def fork_child(work: Callable[[int, int], None]) -> Child:
    """Run work(out_fd, in_fd) in a forked process: out_fd the write end of a
    pipe the parent reads (Child.read), in_fd the read end of one it writes
    (Child.send). The child dies with the parent, takes SIGTERM, SIGINT and
    SIGHUP as killing it (a stop is the parent's to handle), and exits 0 if
    work returns, 1 if it raises (with one line on stderr). Fork only when
    no other thread runs: a lock a thread holds stays held forever in the
    child."""
    r, w = os.pipe2(os.O_CLOEXEC)
    child_in, to_child = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            os.close(to_child)
            # work closes w when it fails; this copy keeps the pipe open until
            # _exit, so the parent sees it close only after our failure line
            os.dup(w)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            die_with_parent(parent)
            work(w, child_in)
            code = 0
        except BaseException as e:
            os.write(2, f"cis490-reconcile: forked process {os.getpid()} failed: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    os.close(child_in)
    return Child(pid, r, to_child)


_RENAME_NOREPLACE = 1  # linux/fs.h


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Move src to dst without ever replacing an existing dst (FileExistsError
    instead). renameat2(RENAME_NOREPLACE) where the filesystem has it. Where
    it has not (NFS, FUSE filesystems such as bindfs: EINVAL), src is first
    hard linked to dst (a link refuses to replace too; where it fails, as on
    a filesystem without hard links, nothing has moved), then renamed to a
    name only this call uses, in dst's directory, and that name unlinked if
    it is dst's file. Never an unlink of src by name: a file renamed over
    src meanwhile (a receiver's re-send) would go; such a file is linked
    back to src, or, if a newer one has src by then, kept under the private
    name (the newer one's rename would have deleted it). A crash in between
    leaves the file under both names, or the re-send under the private
    name, never a lost file."""
    import ctypes  # only loaded when something is moved

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    private = f".{dst}.{secrets.token_hex(8)}.moving"
    try:
        os.rename(src, private, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except FileNotFoundError:
        return  # src's name went meanwhile: the file has dst's alone
    except OSError:
        os.unlink(dst, dir_fd=dst_dir_fd)  # the link just made: nothing moved
        raise
    moved, linked = (os.stat(name, dir_fd=dst_dir_fd, follow_symlinks=False) for name in (private, dst))
    if not os.path.samestat(moved, linked):  # renamed over src between the link and the rename
        try:
            os.link(private, src, src_dir_fd=dst_dir_fd, dst_dir_fd=src_dir_fd, follow_symlinks=False)
        except FileExistsError:  # renamed over again since: the newer file has src, this one stays
            return  # under the private name; the move to dst is done all the same
    os.unlink(private, dir_fd=dst_dir_fd)
