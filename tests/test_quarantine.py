"""--quarantine-dir: corrupt tarballs are moved aside (never deleted), so the
shipper's retry can re-send them; good files and re-sends are never moved."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Receiver, as_verified, episode, parse_events, tar_bytes, tmpfs, zstd

from cis490_reconcile import quarantine, syscalls

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def corrupt_blob() -> bytes:
    return zstd(tar_bytes(episode()))[:-40]  # cut short, as by a full disk


def test_corrupt_tarball_is_moved_with_a_sidecar_and_resent_copies_are_indexed(
    receiver: Receiver, tmp_path: Path
) -> None:
    qdir = tmp_path / "quarantine"
    qdir.mkdir()
    receiver.tarball("h1", "good")
    first_bytes = corrupt_blob()
    receiver.tarball("h1", "cut", blob=first_bytes)

    one = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    assert one.returncode == 0
    moved = one.one("tarball_quarantined")
    assert moved["path"] == "h1/cut.tar.zst" and moved["quarantine_path"] == str(qdir / "h1/cut.tar.zst")
    assert not (receiver.episodes / "h1/cut.tar.zst").exists()
    assert (qdir / "h1/cut.tar.zst").read_bytes() == first_bytes
    sidecar = json.loads((qdir / "h1/cut.tar.zst.json").read_text())
    assert sidecar["reason"] == moved["reason"] and "zstd" in sidecar["reason"]
    assert sidecar["original_path"] == "h1/cut.tar.zst" and sidecar["size_bytes"] == len(first_bytes)
    assert sidecar["quarantined_at"].startswith("20")
    assert receiver.keys() == [("h1", "good")]
    assert one.one("pass_finished")["quarantined"] == 1

    # a new process: the shipper's retry re-sent it whole; it is indexed, the quarantine kept
    receiver.tarball("h1", "cut")
    two = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    assert two.returncode == 0 and two.named("tarball_quarantined") == []
    assert receiver.keys() == [("h1", "good"), ("h1", "cut")]
    assert (qdir / "h1/cut.tar.zst").read_bytes() == first_bytes

    # more corrupt files; a name whose sidecar is left over takes the next free name
    receiver.tarball("h1", "again", blob=b"not zstd")
    receiver.tarball("h3", "cut", blob=b"garbage")
    (qdir / "h3").mkdir()
    (qdir / "h3/cut.tar.zst.json").write_text("{}")  # a sidecar left by a crash before its rename
    three = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    assert three.returncode == 0
    assert sorted(e["quarantine_path"] for e in three.named("tarball_quarantined")) == [
        str(qdir / "h1/again.tar.zst"),
        str(qdir / "h3/cut.1.tar.zst"),
    ]
    assert (qdir / "h1/cut.tar.zst").read_bytes() == first_bytes
    assert (qdir / "h3/cut.1.tar.zst").read_bytes() == b"garbage"


@ROOT_ONLY
def test_a_move_that_fails_leaves_no_sidecar_and_takes_no_name(receiver: Receiver, tmp_path: Path) -> None:
    """A real EXDEV (the episodes bound over themselves, past preflight): the
    sidecar written before the rename goes with the failure. Left behind, each
    failed pass used to take one more of the episode's 1000 names."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    path = receiver.tarball("h1", "e", blob=corrupt_blob())
    subprocess.run(["mount", "--bind", str(receiver.episodes), str(receiver.episodes)], check=True)
    try:
        with as_verified(receiver, "h1", "e") as (host, seen):
            for _ in range(3):
                with pytest.raises(OSError, match="cross-device"):
                    quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    finally:
        subprocess.run(["umount", str(receiver.episodes)], check=True)
    assert path.exists() and list(qdir.rglob("*")) == [qdir / "h1"]


def fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, each directory fsync ("fsync <path>") and each move
    ("rename") of the quarantine code, in order, as they happen."""
    done: list[str] = []
    fsync_dir, rename = syscalls.fsync_dir, syscalls.rename_noreplace

    def noted_fsync(path: str | os.PathLike[str] | int) -> None:
        done.append("fsync " + (os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)))
        fsync_dir(path)

    def noted_rename(*args: object) -> None:
        done.append("rename")
        rename(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(syscalls, "fsync_dir", noted_fsync)
    monkeypatch.setattr(syscalls, "rename_noreplace", noted_rename)
    return done


def test_a_new_host_directory_is_made_durable_before_a_file_moves_into_it(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's name goes away durably (its directory is fsynced after
    the move); the quarantine's new host directory must be there as surely,
    or a crash could lose both names of the file."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    receiver.tarball("h1", "e", blob=corrupt_blob())
    done = fsyncs_and_renames(monkeypatch)
    with as_verified(receiver, "h1", "e") as (host, seen):
        quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert done.index(f"fsync {qdir}") < done.index("rename"), done


def test_a_resend_caught_in_the_move_with_its_name_taken_again_is_said_where_it_is(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-send lands between the check and the rename (so it is what moved),
    and a third file takes the name before it can go back: it stays in the
    quarantine, moved, not lost, its sidecar says it was not verified, and
    the error names where it is (not 'it stays in place')."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    path = receiver.tarball("h1", "e", blob=corrupt_blob())
    rename = syscalls.rename_noreplace
    calls: list[bytes] = []

    def racing(*args: object) -> None:
        calls.append(b"resent" if not calls else b"third")  # the receiver, just before each rename
        (path.parent / ".upload").write_bytes(calls[-1])
        os.rename(path.parent / ".upload", path)
        rename(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(syscalls, "rename_noreplace", racing)
    gone_back = pytest.raises(quarantine.QuarantineRace, match=r"not verified, is at .*/q/h1/e\.tar\.zst$")
    with as_verified(receiver, "h1", "e") as (host, seen), gone_back:
        quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert path.read_bytes() == b"third" and (qdir / "h1/e.tar.zst").read_bytes() == b"resent"
    sidecar = json.loads((qdir / "h1/e.tar.zst.json").read_text())
    assert sidecar["reason"].startswith("not verified") and sidecar["size_bytes"] == len(b"resent")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
@pytest.mark.parametrize(
    ("syscall", "nth", "unconfirmed"),
    [
        ("fsync", 2, "not made durable"),  # the 1st makes the sidecar durable, before the rename
        ("newfstatat", 4, "not checked to be the file verified"),  # before: fstat, _free_name x2
    ],
)
def test_a_move_whose_check_or_fsync_fails_after_the_rename_is_said_moved(
    receiver: Receiver, tmp_path: Path, syscall: str, nth: int, unconfirmed: str
) -> None:
    """A real EIO after the rename, in the real command (strace fails the
    syscall on DIR/<host_id>, as a disk failing its journal commit or a
    network filesystem losing its server would): the file has moved. The
    event says where, and what is not confirmed, and the pass counts it
    quarantined; it used to say quarantine_failed, "it stays in place"."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    blob = corrupt_blob()
    path = receiver.tarball("h1", "cut", blob=blob)
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-P", str(qdir / "h1"), "-e", f"trace={syscall}"]
    strace += ["-e", f"inject={syscall}:error=EIO:when={nth}"]
    argv = strace + receiver.argv("--once", "--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=receiver.root)
    assert proc.returncode == 0, proc.stderr
    events = parse_events(proc.stdout)
    assert not path.exists() and (qdir / "h1/cut.tar.zst").read_bytes() == blob
    assert [e for e in events if e["event"] == "quarantine_failed"] == []
    (moved,) = [e for e in events if e["event"] == "tarball_quarantined"]
    assert moved["quarantine_path"] == str(qdir / "h1/cut.tar.zst")
    assert unconfirmed in moved["error"] and os.strerror(errno.EIO) in moved["error"]
    assert [e["quarantined"] for e in events if e["event"] == "pass_finished"] == [1]


def test_dry_run_moves_nothing(receiver: Receiver, tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    qdir.mkdir()
    receiver.tarball("h1", "cut", blob=corrupt_blob())
    result = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0", "--dry-run")
    assert result.returncode == 0 and result.named("tarball_corrupt")
    assert (receiver.episodes / "h1/cut.tar.zst").exists() and list(qdir.iterdir()) == []


def test_a_file_replaced_after_its_verdict_is_not_moved(receiver: Receiver, tmp_path: Path) -> None:
    """The receiver re-sent the episode between our verdict and the move."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    path = receiver.tarball("h1", "e", blob=corrupt_blob())
    with as_verified(receiver, "h1", "e") as (host, seen):
        resent = zstd(tar_bytes(episode()))
        fresh = receiver.episodes / "h1/.e.upload"
        fresh.write_bytes(resent)
        os.rename(fresh, path)
        with pytest.raises(quarantine.QuarantineRace):
            quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert path.read_bytes() == resent
    assert list(qdir.rglob("*.tar.zst")) == []


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "otherfs", "1m") as mount:
        yield mount


@ROOT_ONLY
def test_refuses_a_quarantine_on_another_filesystem(receiver: Receiver, other_fs: Path) -> None:
    result = receiver.run("--quarantine-dir", str(other_fs))
    assert result.returncode == 2
    assert "another filesystem" in result.stderr and len(result.stderr.splitlines()) == 1


@ROOT_ONLY
def test_refuses_a_quarantine_in_another_mount_of_the_same_filesystem(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The episodes bound over themselves (as systemd's ReadOnlyPaths= does):
    one st_dev, but a rename out of them fails with EXDEV. Refused before the
    pass, in one line, instead of a failed move each pass."""
    qdir = tmp_path / "quarantine"
    qdir.mkdir()
    receiver.tarball("h1", "cut", blob=corrupt_blob())
    subprocess.run(["mount", "--bind", str(receiver.episodes), str(receiver.episodes)], check=True)
    try:
        assert receiver.episodes.stat().st_dev == qdir.stat().st_dev
        result = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    finally:
        subprocess.run(["umount", str(receiver.episodes)], check=True)
    assert result.returncode == 2, result.stdout
    assert "in another mount than" in result.stderr and len(result.stderr.splitlines()) == 1
    assert (receiver.episodes / "h1" / "cut.tar.zst").exists() and list(qdir.iterdir()) == []


@pytest.mark.parametrize("where", ["inside", "root", "missing", "file"])
def test_refuses_a_quarantine_inside_the_root_or_not_a_directory(
    receiver: Receiver, tmp_path: Path, where: str
) -> None:
    receiver.tarball("h1", "cut", blob=corrupt_blob())
    qdir = {
        "inside": receiver.episodes / "quarantine",
        "root": receiver.episodes,
        "missing": tmp_path / "nope",
        "file": receiver.index,
    }[where]
    if where == "inside":
        qdir.mkdir()
    receiver.index.touch()
    result = receiver.run("--quarantine-dir", str(qdir), "--quarantine-min-age", "0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("cis490-reconcile: error: --quarantine-dir")
    assert len(result.stderr.splitlines()) == 1
    assert (receiver.episodes / "h1/cut.tar.zst").exists()


def test_a_resend_that_lands_between_check_and_rename_is_put_back(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest race: the receiver renames a re-send over the name after
    the pre-move check. The moved inode is not the verified one, so it goes
    back to its name and its sidecar is removed; both directories are then
    fsynced, or a power cut could leave the re-send in the quarantine with
    no sidecar, and the store without it."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    path = receiver.tarball("h1", "e", blob=corrupt_blob())
    resent = zstd(tar_bytes(episode()))
    real_free_name = quarantine._free_name

    def free_name_then_resend(qfd: int, episode_id: str) -> str:
        name = real_free_name(qfd, episode_id)
        fresh = receiver.episodes / "h1/.e.upload"
        fresh.write_bytes(resent)
        os.rename(fresh, path)  # the receiver's atomic re-send
        return name

    monkeypatch.setattr(quarantine, "_free_name", free_name_then_resend)
    done = fsyncs_and_renames(monkeypatch)
    with (
        as_verified(receiver, "h1", "e") as (host, seen),
        pytest.raises(quarantine.QuarantineRace, match="replaced while it was being moved"),
    ):
        quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert path.read_bytes() == resent  # back at its name, whole
    assert sorted(p.name for p in (qdir / "h1").iterdir()) == []  # no tarball, no sidecar
    h1, q1 = str(receiver.episodes / "h1"), str(qdir / "h1")
    assert done[done.index("rename", done.index("rename") + 1) :] == ["rename", f"fsync {h1}", f"fsync {q1}"]


def test_a_host_directory_left_by_a_move_that_died_is_made_durable_before_a_file_moves_into_it(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass killed between the mkdir and its fsync (kill -9, the watchdog)
    leaves the directory in the page cache only; the next move finds it
    there. Moved into it without an fsync of the quarantine, the file could
    lose both names in a power cut: the store's goes durably after the move."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    receiver.tarball("h1", "e", blob=corrupt_blob())

    def killed(path: str | os.PathLike[str] | int) -> None:
        raise SystemExit("killed before the fsync")

    with as_verified(receiver, "h1", "e") as (host, seen):
        with monkeypatch.context() as m, pytest.raises(SystemExit):
            m.setattr(syscalls, "fsync_dir", killed)
            quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
        assert (qdir / "h1").is_dir() and (receiver.episodes / "h1/e.tar.zst").exists()
        done = fsyncs_and_renames(monkeypatch)
        quarantine.move(host, seen, "zstd: truncated", qdir, "2026-11-30T00:00:00+00:00")
    assert f"fsync {qdir}" in done and done.index(f"fsync {qdir}") < done.index("rename"), done


def test_a_quarantine_whose_host_directory_is_the_episodes_root_moves_nothing(receiver: Receiver) -> None:
    """--quarantine-dir the root's parent (outside the root, so preflight lets
    it be) and a host named like the root: DIR/<host_id> is the root itself.
    A move there would put the tarball and its sidecar in the store, skipped
    by every pass after (not a host directory), the quarantine inside the root."""
    path = receiver.tarball(receiver.episodes.name, "cut", blob=corrupt_blob())
    result = receiver.run("--quarantine-dir", str(receiver.root), "--quarantine-min-age", "0")
    assert result.returncode == 0 and result.named("tarball_quarantined") == []
    assert "episodes root" in result.one("quarantine_failed")["error"]
    assert path.exists() and sorted(p.name for p in receiver.episodes.iterdir()) == [receiver.episodes.name]
