"""A store on a network, cluster or FUSE filesystem, where the index lock
cannot be trusted: a pass refuses to run (exit 2, one line on stderr) unless
allow_network_fs; a dry run, status, check and scrub warn and carry on. On a real
FUSE mount (bindfs over a local directory; needs root and /dev/fuse). NFS
cannot be mounted here, so the table of filesystem types is unit-tested."""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import LockHolder, Receiver, as_verified, episode, parse_events, tar_bytes, zstd

from cis490_reconcile import config, fstypes, preflight, quarantine, syscalls

FUSE_MAGIC = 0x65735546


def _why_no_fuse() -> str | None:
    if os.geteuid() != 0:
        return "mounting bindfs needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (apt-get install bindfs)"
    return None


NEEDS_FUSE = pytest.mark.skipif(_why_no_fuse() is not None, reason=str(_why_no_fuse()))


class Mount(NamedTuple):
    path: Path  # the FUSE mount
    backing: Path  # the local directory it shows


@pytest.fixture
def fuse(tmp_path: Path) -> Iterator[Mount]:
    """A bindfs mount of a local directory, unmounted even if the test fails."""
    mount = Mount(tmp_path / "fuse", tmp_path / "backing")
    mount.path.mkdir()
    mount.backing.mkdir()
    subprocess.run(["bindfs", str(mount.backing), str(mount.path)], check=True, timeout=30)
    try:
        yield mount
    finally:
        if subprocess.run(["fusermount", "-u", str(mount.path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount.path)], check=True, timeout=30)


def store(root: Path) -> Receiver:
    """Three tarballs, the receiver's row for one of them."""
    root.mkdir(exist_ok=True)
    receiver = Receiver(root)
    for episode_id in ("a", "b", "c"):
        receiver.tarball("h1", episode_id)
    receiver.append_row(receiver.receiver_row("h1", "a"))
    return receiver


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry below `root`: a file's bytes, None for a directory."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


@NEEDS_FUSE
@pytest.mark.parametrize(
    ("place", "flag", "risk"),
    [
        ("index", "--index", "rows could be appended twice or glued together"),
        ("lock", "--lock-file", "rows could be appended twice or glued together"),
        ("episodes", "--episodes-root", "a tarball still being written can look settled"),
        ("state", "--state-dir", "SQLite's WAL mode need not work there"),
    ],
)
def test_a_pass_refuses_a_place_on_fuse_in_one_line(
    tmp_path: Path, fuse: Mount, place: str, flag: str, risk: str
) -> None:
    receiver = store(tmp_path / "local")
    args: list[str] = []
    if place == "index":
        receiver.index = path = fuse.path / "index.jsonl"
        receiver.append_row(receiver.receiver_row("h1", "a"))
    elif place == "episodes":
        shutil.copytree(receiver.episodes, fuse.path / "episodes")
        receiver.episodes = path = fuse.path / "episodes"
    elif place == "lock":
        path = fuse.path / "index.lock"
        args = ["--lock-file", str(path)]
    else:
        path = fuse.path / "state"
        path.mkdir()
        args = ["--state-dir", str(path)]
    index_before, mount_before = receiver.index.read_bytes(), tree(fuse.path)

    result = receiver.run(*args)

    assert result.returncode == 2
    assert result.stdout == ""
    line = result.stderr
    assert line.count("\n") == 1 and line.endswith("; set allow_network_fs to run anyway\n"), line
    assert line.startswith(f"cis490-reconcile: error: {flag} {path}: on a FUSE filesystem (fuse"), line
    assert risk in line
    assert receiver.index.read_bytes() == index_before  # untouched
    assert tree(fuse.path) == mount_before  # nothing created or changed on the mount


@NEEDS_FUSE
@pytest.mark.parametrize("source", ["flag", "environment", "file"])
def test_allow_network_fs_runs_the_pass_and_the_log_says_so(
    tmp_path: Path, fuse: Mount, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = store(fuse.path / "store")
    before = receiver.index.read_bytes()
    args: list[str] = []
    if source == "flag":
        args = ["--allow-network-fs"]
    elif source == "environment":
        monkeypatch.setenv("CIS490_RECONCILE_ALLOW_NETWORK_FS", "true")
    else:
        toml = tmp_path / "reconcile.toml"
        toml.write_text("allow_network_fs = true\n")
        args = ["--config", str(toml)]

    result = receiver.run(*args)

    assert result.returncode == 0, result.stderr
    assert result.one("pass_finished")["backfilled"] == 2
    problems = [e["problem"] for e in result.named("network_filesystem")]
    assert [p.split(" ")[0] for p in problems] == ["--index", "--episodes-root"]
    assert result.events[0]["event"] == "network_filesystem"  # said before the pass starts
    after = receiver.index.read_bytes()
    assert after.startswith(before) and after.endswith(b"\n")
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b"), ("h1", "c")]  # whole lines, each a row
    assert (fuse.backing / "store" / "index.jsonl").read_bytes() == after  # through FUSE to the disk


@NEEDS_FUSE
@pytest.mark.parametrize("family", ["flock", "lockf"])
def test_the_risk_allow_network_fs_takes_is_real(tmp_path: Path, fuse: Mount, family: str) -> None:
    """bindfs keeps locks on its own inode: a receiver holding its lock on the
    file itself does not stop a pass through the mount."""
    receiver = store(fuse.backing / "store")
    through_fuse = Receiver.__new__(Receiver)
    through_fuse.root, through_fuse.episodes = fuse.path / "store", fuse.path / "store" / "episodes"
    through_fuse.index = fuse.path / "store" / "index.jsonl"
    with LockHolder(receiver.index, family):
        local = receiver.run("--lock-timeout", "0.5")
        assert local.returncode == 1 and "could not lock" in local.one("pass_failed")["error"]
        result = through_fuse.run("--allow-network-fs", "--lock-timeout", "0.5")
        assert result.returncode == 0, result.stdout
        assert result.one("pass_finished")["backfilled"] == 2  # appended under the receiver's lock
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b"), ("h1", "c")]


@NEEDS_FUSE
def test_a_dry_run_warns_and_runs(fuse: Mount) -> None:
    receiver = store(fuse.path / "store")
    before = receiver.index.read_bytes()
    result = receiver.run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["episode_id"] for line in result.stdout.splitlines()] == ["b", "c"]
    problem = result.named("network_filesystem")[0]["problem"]
    assert problem.startswith(f"--index {receiver.index}: on a FUSE filesystem (fuse")
    assert receiver.index.read_bytes() == before


@NEEDS_FUSE
def test_status_warns_and_reports_as_usual(fuse: Mount) -> None:
    receiver = store(fuse.path / "store")
    argv = receiver.argv(command="status")

    gaps = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    warnings = gaps.stderr.splitlines()
    assert [w.split(": ")[:3] for w in warnings] == [
        ["cis490-reconcile status", "warning", f"--index {receiver.index}"],
        ["cis490-reconcile status", "warning", f"--episodes-root {receiver.episodes}"],
    ]
    assert all("on a FUSE filesystem (fuse" in w for w in warnings)
    assert gaps.returncode == 1  # two settled tarballs without a row: needs attention, as always
    assert "settled tarballs not indexed" in gaps.stdout

    assert receiver.run("--allow-network-fs").returncode == 0
    clean = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0 and clean.stdout.endswith("clean\n")
    assert clean.stderr.splitlines() == warnings  # warned every time: the risk stays


@NEEDS_FUSE
def test_scrub_warns_and_scrubs(tmp_path: Path, fuse: Mount) -> None:
    receiver = store(fuse.path / "store")
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.run(
        receiver.argv("--state-dir", str(state), command="scrub"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert [w.split(": ")[:2] for w in proc.stderr.splitlines()] == [
        ["cis490-reconcile scrub", "warning"]
    ] * 2
    finished = [e for e in parse_events(proc.stdout) if e["event"] == "scrub_finished"]
    assert finished and finished[0]["checked"] == 1


@NEEDS_FUSE
def test_check_warns_and_answers(fuse: Mount) -> None:
    receiver = store(fuse.path / "store")
    tarball = receiver.episodes / "h1" / "b.tar.zst"
    proc = subprocess.run(
        receiver.argv("--json", str(tarball), command="check"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert [w.split(": ")[:3] for w in proc.stderr.splitlines()] == [
        ["cis490-reconcile check", "warning", f"--index {receiver.index}"],
        ["cis490-reconcile check", "warning", f"--episodes-root {receiver.episodes}"],
    ]
    answer = json.loads(proc.stdout)
    assert (answer["verdict"], answer["index"]["found"]) == ("intact", "not indexed")


@NEEDS_FUSE
def test_a_reload_onto_fuse_is_refused_and_the_loop_runs_on(tmp_path: Path, fuse: Mount) -> None:
    receiver = store(tmp_path / "local")
    toml = tmp_path / "reconcile.toml"
    toml.write_text("interval = 0.2\n")
    proc = subprocess.Popen(
        receiver.argv("--config", str(toml)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 20

    def wait_event(name: str) -> dict:
        while time.monotonic() < deadline:
            event = json.loads(lines.get(timeout=20))
            if event["event"] == name:
                return event
        raise AssertionError(f"no {name} event")

    lock = fuse.path / "index.lock"
    try:
        wait_event("pass_finished")
        toml.write_text(f'interval = 0.2\nlock_file = "{lock}"\n')
        proc.send_signal(signal.SIGHUP)
        error = wait_event("config_reload_failed")["error"]
        assert error.startswith(f"--lock-file {lock}: on a FUSE filesystem (fuse"), error
        assert error.endswith("; set allow_network_fs to run anyway")
        assert wait_event("pass_finished")["backfilled"] == 0  # the old config runs on
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode == 0
    assert not lock.exists()
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b"), ("h1", "c")]


@NEEDS_FUSE
def test_the_mount_is_fuse_by_statfs_and_by_mountinfo(fuse: Mount) -> None:
    assert syscalls.filesystem_type(fuse.path) == FUSE_MAGIC
    assert syscalls.filesystem_type(fuse.backing) != FUSE_MAGIC
    assert (syscalls.mount_type(fuse.path) or "").startswith("fuse")


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
    locks = (
        "locks there are kept by the server, or by this client alone, and flock may be emulated with record "
        "locks, so ours need not exclude the receiver's: rows could be appended twice or glued together"
    )
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
        f"--index {nfs}/index.jsonl: on a network filesystem (nfs4): {locks}",
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
        f"--lock-file {nfs}/lk: on a network filesystem (nfs): {locks}",
    ]


@NEEDS_FUSE
def test_a_move_without_rename_noreplace_never_deletes_a_resend(
    fuse: Mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bindfs (like NFS) has no RENAME_NOREPLACE, so a quarantine move falls
    back to a hard link. A re-send renamed over the tarball's name while it
    is being moved must stay: unlinking that name after the link deleted it."""
    store, qdir = fuse.path / "episodes" / "h1", fuse.path / "quarantine"
    store.mkdir(parents=True)
    qdir.mkdir()
    (store / "e.tar.zst").write_bytes(b"corrupt")
    link = os.link
    resent: list[bool] = []

    def link_then_resend(*args: object, **kwargs: object) -> None:
        link(*args, **kwargs)  # type: ignore[arg-type]
        if not resent:  # the receiver's re-send lands at the name, by rename, as it writes them
            (store / ".upload").write_bytes(b"resent")
            os.rename(store / ".upload", store / "e.tar.zst")
            resent.append(True)

    monkeypatch.setattr(os, "link", link_then_resend)
    (store / "f.tar.zst").write_bytes(b"f")
    (qdir / "f.tar.zst").write_bytes(b"taken")
    src, dst = os.open(store, os.O_RDONLY), os.open(qdir, os.O_RDONLY)
    try:
        syscalls.rename_noreplace(src, "e.tar.zst", dst, "e.tar.zst")
        with pytest.raises(FileExistsError):  # nothing replaced, and the file back where it was
            syscalls.rename_noreplace(src, "f.tar.zst", dst, "f.tar.zst")
    finally:
        os.close(src)
        os.close(dst)
    assert resent and (qdir / "e.tar.zst").read_bytes() == b"corrupt"
    assert [(p.name, p.read_bytes()) for p in sorted(store.iterdir())] == [
        ("e.tar.zst", b"resent"),
        ("f.tar.zst", b"f"),
    ]
    assert sorted(p.name for p in qdir.iterdir()) == ["e.tar.zst", "f.tar.zst"]  # no private name left


@NEEDS_FUSE
def test_a_move_without_rename_noreplace_raced_by_two_resends_keeps_its_sidecar(
    fuse: Mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two re-sends land during the link fallback: the first after the link
    (so it is what the rename takes to the private name), the second before
    that one can be linked back. The verified file has moved all the same:
    it must keep its sidecar and be said quarantined. The link back's
    EEXIST used to be raised as the move's: the sidecar was removed and
    quarantine_failed said "it stays in place"."""
    receiver = Receiver(fuse.path)
    blob = zstd(tar_bytes(episode()))[:-40]
    path = receiver.tarball("h1", "e", blob=blob)
    qdir = fuse.path / "quarantine"
    qdir.mkdir()
    link, links = os.link, []

    def resend(data: bytes) -> None:  # the receiver's atomic re-send
        (path.parent / ".upload").write_bytes(data)
        os.rename(path.parent / ".upload", path)

    def racing(*args: object, **kwargs: object) -> None:
        links.append(args)
        if len(links) == 2:
            resend(b"second")
        link(*args, **kwargs)  # type: ignore[arg-type]
        if len(links) == 1:
            resend(b"first")

    with as_verified(receiver, "h1", "e") as (host, seen):
        monkeypatch.setattr(os, "link", racing)
        moved = quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert len(links) == 2 and moved.path == qdir / "h1/e.tar.zst"
    assert moved.path.read_bytes() == blob and path.read_bytes() == b"second"
    assert json.loads((qdir / "h1/e.tar.zst.json").read_text())["reason"] == "zstd: truncated"
    hidden = [p.read_bytes() for p in (qdir / "h1").iterdir() if p.name.endswith(".moving")]
    assert hidden == [b"first"]  # superseded by the second, as its rename would have deleted it: kept


@NEEDS_FUSE
def test_a_move_without_rename_noreplace_that_cannot_link_leaves_the_file_in_place(
    tmp_path: Path, fuse: Mount
) -> None:
    """Where the link fallback cannot link (a filesystem without hard links,
    such as SMB or a bucket mount; here a real EMLINK, the tarball having
    ext4's most links), the move must fail with the file still at its name.
    Renamed aside first, it stayed under a hidden name in the quarantine,
    with no sidecar, and quarantine_failed said neither."""
    receiver = Receiver(fuse.path)
    receiver.tarball("h1", "cut", blob=b"\x28\xb5\x2f\xfd" + b"cut short")
    links = fuse.backing / "links"
    links.mkdir()
    for n in range(70_000):
        try:
            os.link(fuse.backing / "episodes/h1/cut.tar.zst", links / str(n))
        except OSError as e:
            assert e.errno == errno.EMLINK
            break
    else:
        pytest.skip("the backing filesystem takes more than 70,000 links (ext4 takes 65,000)")
    qdir = fuse.path / "quarantine"
    qdir.mkdir()
    result = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0", "--allow-network-fs")
    assert result.returncode == 0, result.stderr
    assert result.one("quarantine_failed")["error"] == os.strerror(errno.EMLINK)
    assert (receiver.episodes / "h1/cut.tar.zst").exists()
    assert list(qdir.rglob("*")) == [qdir / "h1"]  # no hidden name, no sidecar
