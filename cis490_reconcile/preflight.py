"""What must hold of the machine before a command runs: the paths are what
they should be, the dictionaries load, the user is the index's. Each failure
is a ConfigError: one line on stderr naming the flag, and exit 2, before
anything is read or written. (config.py parses values; this looks at the
filesystem they name.) Which paths are on a network filesystem is only said
here: a pass refuses them, status and scrub warn."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TextIO

from . import fstypes, syscalls
from .config import Config, ConfigError

DICTIONARY_MAX_BYTES = 16 << 20


def check_paths(cfg: Config) -> None:
    """Paths must make sense before a pass starts: the root a directory, the
    index a regular file (or absent, in an existing directory)."""
    if (why := syscalls.not_a_directory(cfg.episodes_root)) is not None:
        raise ConfigError(f"--episodes-root {cfg.episodes_root}: {why}")
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
    """A rename target: an existing directory in the episodes' mount, and
    not inside the episodes root (it would be scanned as a host)."""
    flag = f"--quarantine-dir {qdir}"
    try:
        st = os.stat(qdir)
    except OSError as e:
        raise ConfigError(f"{flag}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{flag}: not a directory")
    if st.st_dev != os.stat(root).st_dev:
        raise ConfigError(f"{flag}: on another filesystem than {root}; a quarantine move must be a rename")
    if syscalls.mount_id(qdir) != syscalls.mount_id(root):
        raise ConfigError(
            f"{flag}: in another mount than {root} (a bind mount, as systemd makes one of each "
            "ReadWritePaths= and ReadOnlyPaths= entry); a quarantine move must be a rename within one mount"
        )
    real_q, real_root = qdir.resolve(), root.resolve()
    if real_q == real_root or real_root in real_q.parents:
        raise ConfigError(f"{flag}: inside the episodes root {root}")


def check_user(cfg: Config) -> None:
    """Refuse root when the index belongs to someone else: rows appended as
    root are fine, but a lock or index file root creates, or a habit of
    running as root, breaks the receiver that runs as its own user (and a
    scrub's lock and database in the state directory, the service's scrub)."""
    if os.geteuid() != 0 or cfg.allow_root:
        return
    target = cfg.index if cfg.index.exists() else cfg.index.parent
    owner = target.stat().st_uid
    if owner != 0:
        raise ConfigError(
            f"refusing to run as root: {target} belongs to uid {owner}; run as that user "
            f"(sudo -u '#{owner}' cis490-reconcile ...) or pass --allow-root"
        )


_ROWS = "so ours need not exclude the receiver's: rows could be appended twice or glued together"
_EPISODES = (
    "the receiver writing there may be on another host, whose sizes and times this one can see late: "
    "a tarball still being written can look settled and be reported corrupt"
)
_STATE = (
    "SQLite's WAL mode need not work there, nor the flock that keeps two passes apart: "
    "the state database could be corrupted"
)


def network_filesystems(cfg: Config) -> list[str]:
    """A line for each place the config names that is on a network, cluster
    or FUSE filesystem (fstypes.py), naming the flag, the path, the type and
    what could go wrong; empty when all are local. The places: the index (its
    directory until it exists), the lock file, the episodes root, the state
    directory (when it is one). A pass refuses to run with the first line
    unless allow_network_fs; status and scrub print them all as warnings."""
    places: list[tuple[str, Path, str | None]] = [("--index", cfg.index, None)]
    if cfg.lock_file not in (None, cfg.index):
        places.append(("--lock-file", cfg.lock_path, None))
    places.append(("--episodes-root", cfg.episodes_root, _EPISODES))
    if cfg.state_dir is not None and syscalls.not_a_directory(cfg.state_dir) is None:
        places.append(("--state-dir", cfg.state_dir, _STATE))
    lines = []
    for flag, path, risk in places:
        fs = _filesystem(path if path.exists() else path.parent)
        if fs is not None:
            lines.append(
                f"{flag} {path}: on a {fs.kind} filesystem ({fs.name}): {risk or fs.why + ', ' + _ROWS}"
            )
    return lines


def warn_network_filesystems(cfg: Config, stderr: TextIO, command: str) -> None:
    """What appends nothing to the index (status, check, scrub) only warns,
    a line each on stderr, and goes on."""
    for problem in network_filesystems(cfg):
        stderr.write(f"cis490-reconcile {command}: warning: {problem}\n")


def _filesystem(path: Path) -> fstypes.Filesystem | None:
    """What `path` is on, if the lock cannot be trusted there, named as its
    mount is (nfs4, fuse.sshfs) where /proc/self/mountinfo tells."""
    try:
        fs = fstypes.classify(syscalls.filesystem_type(path))
    except OSError:  # gone since the checks above: the command meets that itself
        return None
    return None if fs is None else fs._replace(name=syscalls.mount_type(path) or fs.name)
