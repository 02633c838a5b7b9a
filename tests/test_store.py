"""Walking the store through the real command: only regular files with safe
names under <root>/<host>/ are opened; everything odd is skipped and reported."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from helpers import Receiver, episode, tar_bytes, zstd


def test_only_safe_regular_tarballs_are_indexed(receiver: Receiver, tmp_path: Path) -> None:
    eps = receiver.episodes
    receiver.tarball("h1", "good")
    # outside the root: a valid tarball reachable only through symlinks
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tar.zst").write_bytes(zstd(tar_bytes(episode())))
    os.symlink(outside / "secret.tar.zst", eps / "h1" / "link.tar.zst")
    os.symlink(outside, eps / "linkedhost")
    os.symlink("loop.tar.zst", eps / "h1" / "loop.tar.zst")  # a symlink loop
    os.mkfifo(eps / "h1" / "fifo.tar.zst")
    (eps / "h1" / "dir.tar.zst").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(eps / "h1" / "sock.tar.zst"))
    # names: temp files and dotfiles are ignored silently, unsafe names reported
    for name in (".hidden.tar.zst", "up.tar.zst.tmp", "up.tar.zst.partial", "notes.txt"):
        (eps / "h1" / name).write_bytes(zstd(tar_bytes(episode())))
    (eps / "h1" / "ep.tmp").write_bytes(b"")
    for bad in (b"new\nline.tar.zst", b"bad\xffutf8.tar.zst", b"tab\tname.tar.zst"):
        with open(os.path.join(os.fsencode(eps / "h1"), bad), "wb") as f:
            f.write(zstd(tar_bytes(episode())))
    (eps / ".trash").mkdir()
    receiver.tarball(".trash", "x")  # a dot directory at the top is ignored too
    (eps / "stray.tar.zst").write_bytes(b"a file where a host directory should be")

    result = receiver.run(timeout=30)  # a FIFO opened for reading would hang here
    sock.close()
    assert result.returncode == 0, result.stderr
    assert receiver.keys() == [("h1", "good")]
    skipped = {(e["path"], e["reason"]) for e in result.named("store_entry_skipped")}
    assert skipped == {
        ("h1/link.tar.zst", "symlink"),
        ("h1/loop.tar.zst", "symlink"),
        ("h1/fifo.tar.zst", "fifo"),
        ("h1/dir.tar.zst", "directory"),
        ("h1/sock.tar.zst", "socket"),
        ("h1/new\nline.tar.zst", "unsafe episode name"),
        ("h1/bad\\xffutf8.tar.zst", "unsafe episode name"),
        ("h1/tab\tname.tar.zst", "unsafe episode name"),
        ("linkedhost", "host directory is a symlink"),
        ("stray.tar.zst", "not a directory (regular file)"),
    }
    summary = result.one("pass_finished")
    assert summary["skipped"] == len(skipped)
    assert summary["backfilled"] == 1
    assert summary["scanned"] == 6  # good, link, loop, fifo, dir, sock


def test_host_flag_limits_the_pass(receiver: Receiver) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h2", "b")
    result = receiver.run("--host", "h2")
    assert result.returncode == 0
    assert receiver.keys() == [("h2", "b")]
    result = receiver.run("--host", "nope")
    assert result.returncode == 0
    assert result.one("host_not_found")["host_id"] == "nope"


def test_young_files_wait_for_a_later_pass(receiver: Receiver) -> None:
    receiver.tarball("h1", "young")
    result = receiver.run(min_age=3600)
    assert result.one("pass_finished")["in_flight"] == 1
    assert not receiver.index.exists() or receiver.rows() == []
    # an old mtime does not make a just-renamed file settled: ctime counts
    path = receiver.episodes / "h1" / "young.tar.zst"
    os.utime(path, (1_600_000_000, 1_600_000_000))
    assert receiver.run(min_age=3600).one("pass_finished")["in_flight"] == 1
    assert receiver.run(min_age=0).one("pass_finished")["backfilled"] == 1
    assert receiver.keys() == [("h1", "young")]
