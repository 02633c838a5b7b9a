"""What must hold of the machine before a command runs: the paths are what
they should be, on filesystems whose locks can be trusted, the dictionaries
load, the user is the index's. Each failure is a ConfigError: one line on
stderr naming the flag, and exit 2, before anything is read or written.
(config.py parses values; this looks at the filesystem they name.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TextIO

from . import syscalls
from .config import Config, ConfigError

DICTIONARY_MAX_BYTES = 16 << 20


def check_paths(cfg: Config) -> None:
    """Paths must make sense before a pass starts: the root a directory, the
    index a regular file (or absent, in an existing directory)."""
    if not cfg.episodes_root.is_dir():
        raise ConfigError(f"--episodes-root {cfg.episodes_root}: not a directory")
    for flag, path in (("--index", cfg.index), ("--lock-file", cfg.lock_path)):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise ConfigError(f"{flag} {path}: directory {path.parent} does not exist") from None
            continue
        except OSError as e:
            raise ConfigError(f"{flag} {path}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{flag} {path}: not a regular file")
    if cfg.quarantine_dir is not None:
        _check_quarantine(cfg.quarantine_dir, cfg.episodes_root)
    load_dictionaries(cfg.zstd_dictionaries)


def load_dictionaries(paths: tuple[Path, ...]) -> dict[int, bytes]:
    """The dictionaries by id; ConfigError for a file that is not one, or a
    second file with the same id."""
    from .zstdframe import dictionary_id

    found: dict[int, bytes] = {}
    for path in paths:
        flag = f"--zstd-dictionaries {path}"
        try:
            with open(path, "rb") as f:
                data = f.read(DICTIONARY_MAX_BYTES + 1)
            dict_id = dictionary_id(data)
        except OSError as e:
            raise ConfigError(f"{flag}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
        if len(data) > DICTIONARY_MAX_BYTES:
            raise ConfigError(f"{flag}: larger than {DICTIONARY_MAX_BYTES >> 20} MiB")
        if dict_id in found:
            raise ConfigError(f"{flag}: a second dictionary with id {dict_id}")
        found[dict_id] = data
    return found


def _check_quarantine(qdir: Path, root: Path) -> None:
    """A rename target: an existing directory on the episodes' filesystem,
    and not inside the episodes root (it would be scanned as a host)."""
    flag = f"--quarantine-dir {qdir}"
    try:
        st = os.stat(qdir)
    except OSError as e:
        raise ConfigError(f"{flag}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{flag}: not a directory")
    if st.st_dev != os.stat(root).st_dev:
        raise ConfigError(f"{flag}: on another filesystem than {root}; a quarantine move must be a rename")
    real_q, real_root = qdir.resolve(), root.resolve()
    if real_q == real_root or real_root in real_q.parents:
        raise ConfigError(f"{flag}: inside the episodes root {root}")


def check_user(cfg: Config) -> None:
    """Refuse root when the index belongs to someone else: rows appended as
    root are fine, but a lock or index file root creates, or a habit of
    running as root, breaks the receiver that runs as its own user."""
    if os.geteuid() != 0 or cfg.allow_root:
        return
    target = cfg.index if cfg.index.exists() else cfg.index.parent
    owner = target.stat().st_uid
    if owner != 0:
        raise ConfigError(
            f"refusing to run as root: {target} belongs to uid {owner}; run as that user "
            f"(sudo -u '#{owner}' cis490-reconcile ...) or pass --allow-root"
        )


# Filesystems whose locking, caching or shared memory a pass cannot trust, by the
# f_type statfs(2) gives (linux/magic.h; `stat -f -c %t PATH` prints it). FUSE
# covers sshfs, GlusterFS, s3fs, bindfs, virtiofs and the like: whatever is
# behind it decides what a lock means.
NETWORK_FILESYSTEMS = {
    0x6969: "NFS",
    0x517B: "SMB",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB2",
    0x65735546: "FUSE",
    0x00C36400: "CephFS",
    0x0BD00BD0: "Lustre",
    0x47504653: "GPFS",
    0x01021997: "9p",
    0x5346414F: "AFS",
    0x6B414653: "kAFS",
    0x7461636F: "OCFS2",
    0x01161970: "GFS2",
    0x73757245: "Coda",
    0x564C: "NCP",
    0x19830326: "BeeGFS",
    0x20030528: "OrangeFS",
    0xAAD7AAEA: "PanFS",
    0x013111A8: "IBRIX",
    0x61636673: "ACFS",
    0xBACBACBC: "vmhgfs",
    0x786F4256: "vboxsf",
    0x7C7C6673: "prl_fs",
}
_WHY_LOCKS = (
    "the receiver's lock and ours need not exclude each other there (flock may be emulated by "
    "record locks or not passed on at all), so rows could be appended twice or glued together"
)
_WHY = {
    "--index": _WHY_LOCKS,
    "--lock-file": _WHY_LOCKS,
    "--episodes-root": "a tarball may be seen before all its bytes are, and its times lag, "
    "so the in-flight guard cannot be trusted",
    "--state-dir": "SQLite's write-ahead log needs memory shared between processes, "
    "which a network filesystem does not share",
}


def network_filesystems(cfg: Config) -> list[str]:
    """One line for each path of `cfg` on a network or FUSE filesystem: the
    flag and path, the filesystem type, and why it cannot be trusted there.
    A path that does not exist is not looked at (check_paths says so)."""
    paths = [("--index", cfg.index.parent), ("--lock-file", cfg.lock_path.parent)]
    paths += [("--episodes-root", cfg.episodes_root)]
    if cfg.state_dir is not None:
        paths.append(("--state-dir", cfg.state_dir))
    lines = []
    seen = set()
    for flag, directory in paths:
        if (flag, directory) in seen or (flag == "--lock-file" and cfg.lock_file is None):
            continue
        seen.add((flag, directory))
        try:
            name = NETWORK_FILESYSTEMS.get(syscalls.filesystem_type(directory))
            if name is None:
                continue
            mounted = syscalls.mount_type(directory)
        except OSError:
            continue
        shown = {"--index": cfg.index, "--lock-file": cfg.lock_path}.get(flag, directory)
        kind = name if mounted is None or mounted.lower() == name.lower() else f"{name}, {mounted}"
        lines.append(f"{flag} {shown}: on a network filesystem ({kind}): {_WHY[flag]}")
    return lines


def check_filesystems(cfg: Config) -> None:
    """A pass refuses a network filesystem unless allow_network_fs is set."""
    if not cfg.allow_network_fs:
        for line in network_filesystems(cfg):
            raise ConfigError(f"{line}; set allow_network_fs to run anyway")


def warn_filesystems(cfg: Config, stderr: TextIO, command: str) -> None:
    """What does not run a pass (status, check, scrub, a dry run) only warns."""
    if not cfg.allow_network_fs:
        for line in network_filesystems(cfg):
            stderr.write(f"cis490-reconcile{' ' + command if command else ''}: warning: {line}\n")
