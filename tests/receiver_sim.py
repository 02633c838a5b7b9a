"""A receiver simulator, run as its own process, that behaves like the real
receiver: it stores tarballs and appends one row each, under its lock.

    python receiver_sim.py EPISODES INDEX ROWS_OUT --count N --rate R
        --family flock|lockf|ofd|ours --mode rename|direct|locked-rename --delay S

Modes, per tarball:
  rename         write <id>.tar.zst.partial, rename into place, append the
                 row `--delay` seconds later
  direct         write the final name in three chunks, append the row later
  locked-rename  take the lock, rename into place, append the row, release:
                 the row is never missing while the tarball is visible

The row is appended with the project's append primitive (one write on an
O_APPEND fd, torn tail terminated, fdatasync) under a lock of one family:
flock, lockf (POSIX record lock), OFD, or "ours" (index.append_rows: both).
Every row it wrote is also written to ROWS_OUT, so a test can check the
receiver's rows come out byte-identical, and its lag to ROWS_OUT.lag: the
seconds from the tarball's last change (its ctime, which a pass ages) to the
append returning, after which any pass sees the row (0 in locked-rename).
A pass may back-fill a row that comes later than its guard (README: the
in-flight guard is a heuristic), and a loaded machine can hold a row back
past `--delay` (a slow fdatasync, a pass holding the lock), so a test holds
the exactly-one rule to the rows that came within its guard. It never reads
the reconciler's state.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import random
import struct
import tarfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import zstandard

from cis490_reconcile import index


@contextmanager
def family_lock(path: Path, family: str):
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if family == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX)
        elif family == "lockf":
            fcntl.lockf(fd, fcntl.LOCK_EX)
        elif family == "ofd":
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        else:
            raise SystemExit(f"unknown family {family}")
        yield fd
    finally:
        os.close(fd)  # closing releases every family


def tarball(rng: random.Random, episode_id: str) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("meta.json", b'{"code_version": {}}'), ("frames.bin", rng.randbytes(3000))):
            info = tarfile.TarInfo(f"{episode_id}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue())


def row_bytes(host: str, episode_id: str, data: bytes) -> bytes:
    row = {
        "received_at_wall": datetime.now(timezone.utc).isoformat(),
        "host_id": host,
        "episode_id": episode_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "schema_version": 1,
    }
    return index.encode_row(row)


def append(index_path: Path, family: str, line: bytes) -> None:
    if family == "ours":
        index.append_rows(index_path, [json.loads(line)])  # re-encoded identically: sort_keys
        return
    with family_lock(index_path, family) as fd:
        index.LockedIndex(fd).append([line])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("episodes", type=Path)
    p.add_argument("index", type=Path)
    p.add_argument("rows_out", type=Path)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--rate", type=float, default=500.0, help="tarballs per second")
    p.add_argument("--family", default="ofd")
    p.add_argument("--mode", default="rename")
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    due: list[tuple[float, float, bytes]] = []  # rows due later: (when, tarball changed at, line)
    with open(a.rows_out, "ab") as rows_out, open(f"{a.rows_out}.lag", "a") as lags:

        def appended(line: bytes, lag: float) -> None:
            rows_out.write(line)
            row = json.loads(line)
            lags.write(f"{row['host_id']} {row['episode_id']} {lag:.3f}\n")

        def flush_due(now: float) -> None:
            while due and due[0][0] <= now:
                _, changed_at, line = due.pop(0)
                append(a.index, a.family, line)
                appended(line, time.time() - changed_at)

        start = time.monotonic()
        for i in range(a.count):
            host, episode_id = f"r{i % 4}", f"sim-{a.seed}-{i:05}"
            final = a.episodes / host / f"{episode_id}.tar.zst"
            final.parent.mkdir(exist_ok=True)
            data = tarball(rng, episode_id)
            line = row_bytes(host, episode_id, data)
            if a.mode == "locked-rename":
                temp = final.with_name(final.name + ".partial")
                temp.write_bytes(data)
                with family_lock(a.index, a.family) as fd:
                    os.rename(temp, final)
                    index.LockedIndex(fd).append([line])
                appended(line, 0.0)  # visible to a pass no sooner than its tarball
            else:
                if a.mode == "direct":
                    with open(final, "wb") as f:
                        for k in range(3):
                            f.write(data[k * len(data) // 3 : (k + 1) * len(data) // 3])
                            f.flush()
                else:
                    temp = final.with_name(final.name + ".partial")
                    temp.write_bytes(data)
                    os.rename(temp, final)
                due.append((time.monotonic() + a.delay, final.stat().st_ctime, line))
            flush_due(time.monotonic())
            pause = start + (i + 1) / a.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        while due:
            time.sleep(max(0.0, due[0][0] - time.monotonic()))
            flush_due(time.monotonic())


if __name__ == "__main__":
    main()
