"""The filesystems the index lock cannot be trusted on: statfs against
`stat -f`, the table of types, and the lines naming them. NFS cannot be
mounted here, so the table itself is unit-tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cis490_reconcile import config, fstypes, preflight, syscalls


def test_filesystem_type_is_what_stat_f_prints(tmp_path: Path) -> None:
    for path in (tmp_path, Path("/proc"), Path("/dev/shm"), Path(sys.prefix)):
        if path.exists():
            printed = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True)
            assert syscalls.filesystem_type(path) == int(printed.stdout, 16), path
    with pytest.raises(FileNotFoundError):
        syscalls.filesystem_type(tmp_path / "absent")


REFUSED = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x00C36400: "ceph",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "kafs",
    0x7461636F: "ocfs2",
    0x01161970: "gfs2",
    0x73757245: "coda",
    0x564C: "ncpfs",
    0x19830326: "beegfs",
    0x20030528: "orangefs",
}
LOCAL = {
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
}


def test_the_type_table() -> None:
    for magic in fstypes.TYPES:
        fs = fstypes.classify(magic)
        assert fs is not None and fs.name and fs.kind in ("network", "cluster", "FUSE")
        assert "locks there" in fs.why
    assert {magic: fs.name for magic in REFUSED if (fs := fstypes.classify(magic))} == REFUSED
    assert {magic: fstypes.classify(magic) for magic in LOCAL} == dict.fromkeys(LOCAL)


def test_the_lines_name_flag_path_type_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an index on NFS would be told; a local place, a missing state
    directory and a lock file that is the index itself give no line."""
    nfs, local = tmp_path / "nfs", tmp_path / "local"
    (nfs / "state").mkdir(parents=True)
    (local / "episodes").mkdir(parents=True)
    magic = {True: 0x6969, False: 0xEF53}
    monkeypatch.setattr(syscalls, "filesystem_type", lambda path: magic[nfs in (path, *path.parents)])
    monkeypatch.setattr(syscalls, "mount_type", lambda path: "nfs4")
    cfg = config.build(
        {
            "index": nfs / "index.jsonl",
            "lock_file": nfs / "index.jsonl",
            "episodes_root": local / "episodes",
            "state_dir": nfs / "state",
        }
    )
    assert preflight.network_filesystems(cfg) == [
        f"--index {nfs}/index.jsonl: on a network filesystem (nfs4): locks there are kept by the server, "
        "or by this client alone, and flock may be emulated with record locks, so ours need not exclude "
        "the receiver's: rows could be appended twice or glued together",
        f"--state-dir {nfs}/state: on a network filesystem (nfs4): SQLite's WAL mode need not work there, "
        "nor the flock that keeps two passes apart: the state database could be corrupted",
    ]
    monkeypatch.setattr(syscalls, "mount_type", lambda path: None)  # /proc cannot tell: the table's name
    moved = config.build(
        {
            "index": local / "index.jsonl",
            "lock_file": nfs / "lk",
            "episodes_root": local / "episodes",
            "state_dir": nfs / "absent",
        }
    )
    assert preflight.network_filesystems(moved) == [
        f"--lock-file {nfs}/lk: on a network filesystem (nfs): locks there are kept by the server, "
        "or by this client alone, and flock may be emulated with record locks, so ours need not exclude "
        "the receiver's: rows could be appended twice or glued together",
    ]
