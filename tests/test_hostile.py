"""Hostile files in the store: a zip bomb, a 50 MB meta.json, thousands of
tiny members, symlink loops, symlinks out of the root, names with newlines
or invalid UTF-8, a FIFO named like a tarball. The pass finishes, stays
under 64 MiB, never blocks, and opens nothing outside the root."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from helpers import Receiver, parse_events, tar_bytes, zstd

MAX_RSS_KIB = 64 << 10
# Runs the pass and reports the peak RSS of its largest process (and its exit code) on stderr.
WRAPPER = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)"
)


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def zip_bomb(path: Path, size: int) -> None:
    """A valid .tar.zst of a few KB whose one member decodes to `size` zero bytes."""
    with (
        open(path, "wb") as f,
        zstandard.ZstdCompressor(level=1).stream_writer(f) as z,
        tarfile.open(fileobj=z, mode="w|") as tar,
    ):
        info = tarfile.TarInfo("bomb/frames.bin")
        info.size = size
        tar.addfile(info, _Zeros(size))


@pytest.fixture
def hostile(receiver: Receiver, tmp_path: Path) -> tuple[Receiver, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    receiver.tarball("h", "fine")
    (outside / "secret.tar.zst").write_bytes(receiver.tarball("h", "fine").read_bytes())
    h = receiver.episodes / "h"
    zip_bomb(h / "bomb.tar.zst", 1 << 30)
    receiver.tarball("h", "bigmeta", blob=zstd(tar_bytes({"meta.json": b" " * (50 << 20)})))
    receiver.tarball("h", "tiny", {f"m{i:05}": b"x" for i in range(5000)})
    (h / "loop.tar.zst").symlink_to("loop.tar.zst")
    (h / "escape.tar.zst").symlink_to("../../outside/secret.tar.zst")
    os.mkfifo(h / "fifo.tar.zst")
    for name in (b"bad\nname.tar.zst", b"\xff\xfe.tar.zst"):
        with open(os.path.join(os.fsencode(h), name), "wb") as f:
            f.write(receiver.tarball("h", "fine").read_bytes())
    (receiver.episodes / "hostloop").symlink_to("hostloop")
    (receiver.episodes / "hostout").symlink_to(outside)
    return receiver, outside


def test_hostile_store(hostile: tuple[Receiver, Path], tmp_path: Path) -> None:
    receiver, outside = hostile
    argv = receiver.argv("--once", "--workers", "1")
    trace = tmp_path / "trace"
    if shutil.which("strace"):
        argv = ["strace", "-f", "-y", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace), *argv]
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, timeout=120)
    max_rss_kib, rc = map(int, proc.stderr.split()[-2:])
    assert rc == 0, proc.stderr
    events = parse_events(proc.stdout)
    print(f"peak RSS {max_rss_kib / 1024:.1f} MiB")
    assert max_rss_kib < MAX_RSS_KIB

    summary = next(e for e in events if e["event"] == "pass_finished")
    assert receiver.keys() == [("h", "bigmeta"), ("h", "bomb"), ("h", "fine"), ("h", "tiny")]
    assert summary["bytes_read"] < 1 << 20  # the bomb decodes to 1 GiB from a few KB
    reasons = {e["path"]: e["reason"] for e in events if e["event"] == "store_entry_skipped"}
    assert reasons == {
        "h/loop.tar.zst": "symlink",
        "h/escape.tar.zst": "symlink",
        "h/fifo.tar.zst": "fifo",
        "h/bad\nname.tar.zst": "unsafe episode name",  # JSON escapes the newline: still one line
        "h/\\xff\\xfe.tar.zst": "unsafe episode name",
        "hostloop": "host directory is a symlink",
        "hostout": "host directory is a symlink",
    }
    without = [e["path"] for e in events if e["event"] == "tarball_without_commit"]
    assert without == ["h/bigmeta.tar.zst", "h/bomb.tar.zst", "h/tiny.tar.zst"]
    if shutil.which("strace"):
        opened = trace.read_text(errors="replace")
        assert str(outside) not in opened, "something outside the root was opened"
        assert "fifo.tar.zst" not in opened, "the FIFO was opened"
