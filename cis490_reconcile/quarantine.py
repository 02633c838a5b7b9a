"""Moving a corrupt tarball out of the store (opt-in: --quarantine-dir).

The receiver answers a shipper's retry with `already-present` while the
corrupt file sits at its name, so the gap never closes. Moving the file
away lets the next retry re-send it. Nothing is ever deleted: the file is
renamed into DIR/<host_id>/ next to a JSON sidecar saying why and when.

Races, and how each is handled:

- The receiver replaces the file (a re-send) between our verdict and the
  move. Before moving, the name must still be the inode we verified, with
  the size and mtime we read; after moving, the moved inode is checked
  again. If it is not the one we verified, it is renamed back (without
  replacing anything; both directories are then fsynced, as after a move),
  so a good re-send is never quarantined. (Should a third file have
  appeared at the name meanwhile, the move back fails: the re-send stays in
  the quarantine, moved, not lost, its sidecar saying it was not verified,
  and the warning says where it is.)
- A name in the quarantine is taken (the same episode was corrupt before):
  the move never replaces (renameat2 RENAME_NOREPLACE); the next free
  name `<episode>.N.tar.zst` is used.
- A crash after the sidecar is written but before the rename leaves a
  sidecar with no tarball beside it (it names no file, and is never
  deleted), and the tarball still in the store; the next pass finds it
  corrupt again and moves it under the next free name. A rename that fails
  (EXDEV, EACCES) takes its sidecar away with it: it moved nothing. A check
  or fsync that fails after the rename (EIO) leaves the file moved: said
  moved, with what is not confirmed, never "it stays in place".
- The quarantine must be on the episodes' filesystem (a rename, not a copy
  that a crash could leave half-done) and outside the episodes root (or it
  would be scanned as a host directory); preflight.check_paths refuses others.
  DIR may be the root's parent: then a host named like the root has the root
  as its DIR/<host_id>, and its tarballs are not moved.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import NamedTuple

from . import __version__, syscalls
from .store import SUFFIX, HostDir, Tarball

SIDECAR_SUFFIX = ".json"
MAX_NAMES = 1000


class QuarantineRace(OSError):
    """What is at the name now is not the file that was verified."""


class Moved(NamedTuple):
    """Where the file went; `unconfirmed` says what failed after the rename
    (the check of what moved, or the fsyncs), the file moved all the same."""

    path: Path
    unconfirmed: str | None = None


def _free_name(qfd: int, episode_id: str) -> str:
    for n in range(MAX_NAMES):
        name = f"{episode_id}{SUFFIX}" if n == 0 else f"{episode_id}.{n}{SUFFIX}"
        taken = False
        for candidate in (name, name + SIDECAR_SUFFIX):
            try:
                os.stat(candidate, dir_fd=qfd, follow_symlinks=False)
                taken = True
            except FileNotFoundError:
                pass
        if not taken:
            return name
    raise FileExistsError(f"{MAX_NAMES} quarantined copies of {episode_id}")


def _write_sidecar(host_q: Path, name: str, sidecar: dict[str, object]) -> None:
    syscalls.write_atomic(host_q / (name + SIDECAR_SUFFIX), json.dumps(sidecar, indent=2).encode() + b"\n")


def move(host: HostDir, tarball: Tarball, reason: str, qdir: Path, now: str) -> Moved:
    """Rename the verified-corrupt `tarball` into qdir/<host_id>/; return
    where it went. Raises QuarantineRace or OSError, leaving it in place
    (or saying where it is)."""
    if not tarball.unchanged(os.stat(tarball.name, dir_fd=host.fd, follow_symlinks=False)):
        raise QuarantineRace(f"{tarball.path} changed since it was verified")
    host_q = qdir / tarball.host_id
    host_q.mkdir(mode=0o750, exist_ok=True)
    # a crash must not lose the new directory, a moved file in it; every time, not
    # only after our mkdir: a move killed before this fsync left it undurable
    syscalls.fsync_dir(qdir)
    qfd = os.open(host_q, syscalls.O_DIRECTORY_NOFOLLOW)
    try:
        if os.path.samestat(os.fstat(qfd), os.stat("..", dir_fd=host.fd)):  # DIR the root's parent
            raise OSError(errno.EINVAL, f"{host_q} is the episodes root, not outside it")
        name = _free_name(qfd, tarball.episode_id)
        sidecar: dict[str, object] = {
            "host_id": tarball.host_id,
            "episode_id": tarball.episode_id,
            "original_path": tarball.path,
            "reason": reason,
            "size_bytes": tarball.size,
            "quarantined_at": now,
            "quarantined_by": f"cis490-reconcile {__version__}",
        }
        _write_sidecar(host_q, name, sidecar)
        try:
            syscalls.rename_noreplace(host.fd, tarball.name, qfd, name)
        except OSError:
            os.unlink(name + SIDECAR_SUFFIX, dir_fd=qfd)  # nothing moved: the sidecar names no file
            raise
        try:
            moved = os.stat(name, dir_fd=qfd, follow_symlinks=False)
        except OSError as e:  # moved: said so, with what is not known
            return Moved(host_q / name, f"not checked to be the file verified, not durable: {e.strerror}")
        if not tarball.is_file(moved):
            try:
                syscalls.rename_noreplace(qfd, name, host.fd, tarball.name)  # a re-send: give it back
            except FileExistsError:  # a third file has the name now: the re-send stays here, said so
                sidecar["reason"] = f"not verified: a re-send moved while {tarball.path} was quarantined"
                sidecar["size_bytes"] = moved.st_size
                _write_sidecar(host_q, name, sidecar)
                raise QuarantineRace(
                    f"{tarball.path} was replaced while it was being moved, and again before the newer "
                    f"file could go back: that file, not verified, is at {host_q / name}"
                ) from None
            os.unlink(name + SIDECAR_SUFFIX, dir_fd=qfd)
            syscalls.fsync_dir(host.fd)  # the re-send back at its name, surely, before we say so
            syscalls.fsync_dir(qfd)
            raise QuarantineRace(f"{tarball.path} was replaced while it was being moved")
        try:
            syscalls.fsync_dir(qfd)
            syscalls.fsync_dir(host.fd)
        except OSError as e:  # moved, but a crash may undo it
            return Moved(host_q / name, f"not made durable: {e.strerror}")
    finally:
        os.close(qfd)
    return Moved(host_q / name)
