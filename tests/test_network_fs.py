"""A store on a network filesystem is refused by a pass, in one line, and
only warned about by status, check, scrub and a dry run; allow_network_fs
overrides. The mount is real: bindfs (FUSE), as root with /dev/fuse. NFS
cannot be mounted here, so the table of filesystem types is unit-tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Receiver, clean_env

from cis490_reconcile import config, preflight, syscalls

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("bindfs") is None,
    reason="a FUSE mount needs root, /dev/fuse and bindfs (apt-get install bindfs)",
)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    """A bindfs mount of an empty directory: what is written there lands in
    the directory below, through FUSE."""
    below, mount = tmp_path / "below", tmp_path / "fuse"
    below.mkdir()
    mount.mkdir()
    subprocess.run(["bindfs", str(below), str(mount)], check=True)
    try:
        assert syscalls.filesystem_type(mount) == 0x65735546  # FUSE, as `stat -f -c %t` prints
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def store_on(mount: Path) -> Receiver:
    receiver = Receiver(mount)
    receiver.tarball("robot-01", "ep-1", gnu=True)
    receiver.tarball("robot-01", "ep-2", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-01", "ep-1"))
    return receiver


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=clean_env(**env))


@needs_fuse
@pytest.mark.parametrize("where", ["--index", "--episodes-root", "--lock-file", "--state-dir"])
def test_a_pass_refuses_each_path_on_a_network_filesystem_in_one_line(
    receiver: Receiver, mounted: Path, where: str
) -> None:
    """The store is local but for the one path named, which is on the mount."""
    receiver.tarball("robot-01", "ep-1", gnu=True)
    named = {
        "--index": mounted / "index.jsonl",
        "--episodes-root": mounted / "episodes",
        "--lock-file": mounted / "index.lock",
        "--state-dir": mounted,
    }[where]
    if where == "--episodes-root":
        shutil.copytree(receiver.episodes, named)
    touched = [receiver.index, mounted / "index.jsonl"]

    proc = run(receiver.argv("--once", where, str(named)))

    assert (proc.returncode, proc.stdout) == (2, "")
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"cis490-reconcile: error: {where} {named}: on a network filesystem (FUSE): ")
    assert line.endswith("; set allow_network_fs to run anyway")
    why = {"--episodes-root": "in-flight guard", "--state-dir": "SQLite"}.get(where, "lock")
    assert why in line
    assert not any(path.exists() for path in touched)  # nothing appended, nothing created


@needs_fuse
@pytest.mark.parametrize("how", ["flag", "environment", "file"])
def test_allow_network_fs_runs_the_pass_through_fuse(mounted: Path, tmp_path: Path, how: str) -> None:
    receiver = store_on(mounted)
    argv = receiver.argv("--once")
    env = {}
    if how == "flag":
        argv.append("--allow-network-fs")
    elif how == "environment":
        env["CIS490_RECONCILE_ALLOW_NETWORK_FS"] = "true"
    else:
        toml = tmp_path / "reconcile.toml"
        toml.write_text("allow_network_fs = true\n")
        env["CIS490_RECONCILE_CONFIG"] = str(toml)

    proc = run(argv, **env)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert receiver.keys() == [("robot-01", "ep-1"), ("robot-01", "ep-2")]  # whole lines, through FUSE
    assert (tmp_path / "below" / "index.jsonl").read_bytes() == receiver.index.read_bytes()


@needs_fuse
def test_status_check_scrub_and_a_dry_run_only_warn(mounted: Path, tmp_path: Path) -> None:
    receiver = store_on(mounted)
    state = tmp_path / "state"
    state.mkdir()
    tarball = str(receiver.episodes / "robot-01" / "ep-2.tar.zst")
    commands = {
        "status": receiver.argv("--json", command="status"),
        "check": receiver.argv("--json", tarball, command="check"),
        "scrub": receiver.argv("--state-dir", str(state), command="scrub"),
        "": receiver.argv("--once", "--dry-run"),
    }
    for name, argv in commands.items():
        proc = run(argv)
        warnings = [line for line in proc.stderr.splitlines() if ": warning: " in line]
        prefix = f"cis490-reconcile{' ' + name if name else ''}: warning: "
        assert [w.split(": on a network")[0] for w in warnings] == [
            f"{prefix}--index {receiver.index}",
            f"{prefix}--episodes-root {receiver.episodes}",
        ], proc.stderr
        assert proc.returncode in (0, 1), (name, proc.stderr)
    report = json.loads(run(commands["status"]).stdout)
    assert report["hosts"]["robot-01"]["unindexed"] == 1  # it still reports
    assert receiver.keys() == [("robot-01", "ep-1")]  # the dry run wrote nothing


def test_the_table_of_filesystem_types(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every network type is named and refused; local ones pass."""
    local = {0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs", 0x2FC12FC1: "zfs"}
    assert not set(local) & set(preflight.NETWORK_FILESYSTEMS)
    for magic in ("NFS", "SMB", "CIFS", "SMB2", "FUSE", "CephFS", "Lustre", "GPFS", "9p"):
        assert magic in preflight.NETWORK_FILESYSTEMS.values()
    cfg = config.build({"episodes_root": tmp_path, "index": tmp_path / "index.jsonl", "state_dir": ""})
    monkeypatch.setattr(syscalls, "mount_type", lambda path: None)
    for magic, name in [*preflight.NETWORK_FILESYSTEMS.items(), *local.items()]:
        monkeypatch.setattr(syscalls, "filesystem_type", lambda path, magic=magic: magic)
        lines = preflight.network_filesystems(cfg)
        if magic in local:
            assert lines == [], name
            preflight.check_filesystems(cfg)
        else:
            named = [line.split(":")[0] for line in lines]
            assert named == [f"--index {cfg.index}", f"--episodes-root {tmp_path}"]
            assert f"on a network filesystem ({name})" in lines[0]
            with pytest.raises(config.ConfigError, match="set allow_network_fs to run anyway"):
                preflight.check_filesystems(cfg)
            preflight.check_filesystems(config.build({**_values(cfg), "allow_network_fs": True}))


def _values(cfg: config.Config) -> dict[str, object]:
    return {"episodes_root": cfg.episodes_root, "index": cfg.index, "state_dir": ""}


def test_this_machine_s_own_filesystem_is_local(tmp_path: Path) -> None:
    cfg = config.build({"episodes_root": tmp_path, "index": tmp_path / "index.jsonl", "state_dir": tmp_path})
    assert preflight.network_filesystems(cfg) == []
    assert syscalls.filesystem_type(tmp_path) not in preflight.NETWORK_FILESYSTEMS
