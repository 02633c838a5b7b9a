"""`cis490-reconcile demo`: build a small store with gaps in a temporary
directory, reconcile it, and show what happened. Needs nothing but the package."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

from .. import config
from ..basics import iso_utc
from ..index import encode_row
from ..log import make_logger
from ..reconcile import Reconciler
from ..runtime import ExitCode
from . import Context

DEMO_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tar_bytes(members: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed tar of these members, as tarfile writes it (the tests use it too)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def make_tarball(path: Path, members: dict[str, bytes]) -> bytes:
    """Write a .tar.zst with these members (tarfile + zstandard); return its bytes."""
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(tar_bytes(members))
    path.write_bytes(blob)
    return blob


def _episode(host: str, n: int) -> dict[str, bytes]:
    meta = {"episode_id": f"ep-{n:04d}", "host_id": host, "code_version": {"commit": DEMO_COMMIT}}
    return {
        f"ep-{n:04d}/meta.json": json.dumps(meta).encode(),
        f"ep-{n:04d}/frames.bin": os.urandom(4096) * 4,
    }


SETTLE_S = 1.0  # the demo's in-flight guard (--min-age); production uses minutes
IN_FLIGHT = Path("robot-a", "ep-0005.tar.zst")  # still being written during both passes


def build(root: Path) -> tuple[Path, Path]:
    """A store of 3 hosts x 4 episodes received an hour ago, plus: 3 tarballs
    without a row (one of them behind a torn last line), a truncated tarball,
    one still in flight, a temp file, and a garbage line in the index.

    The in-flight guard looks at ctime, which only real time moves: building
    the settled part takes SETTLE_S of sleep."""
    episodes, index = root / "episodes", root / "index.jsonl"
    hour_ago = time.time() - 3600
    lines = []
    for host in ("robot-a", "robot-b", "robot-c"):
        (episodes / host).mkdir(parents=True)
        for n in range(1, 5):
            tar = episodes / host / f"ep-{n:04d}.tar.zst"
            blob = make_tarball(tar, _episode(host, n))
            os.utime(tar, (hour_ago, hour_ago))
            if (host, n) in (("robot-a", 3), ("robot-b", 1), ("robot-c", 4)):
                continue  # the gaps
            row = {
                "received_at_wall": iso_utc(int(hour_ago * 1e9)),
                "host_id": host,
                "episode_id": f"ep-{n:04d}",
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size_bytes": len(blob),
                "schema_version": 1,
                "commit": DEMO_COMMIT,
            }
            lines.append(encode_row(row))
        if host == "robot-b":
            lines.append(b"<<< not json: a line a crashed tool left >>>\n")
    torn = encode_row({"host_id": "robot-c", "episode_id": "ep-0004", "sha256": "ab"})[:40]
    index.write_bytes(b"".join(lines) + torn)
    broken = episodes / "robot-b" / "ep-0005.tar.zst"
    blob = make_tarball(broken, _episode("robot-b", 5))
    broken.write_bytes(blob[: len(blob) // 2])  # a disk that filled up mid-upload
    os.utime(broken, (hour_ago, hour_ago))
    time.sleep(SETTLE_S)
    make_tarball(episodes / IN_FLIGHT, _episode("robot-a", 5))
    (episodes / "robot-a" / ".ep-0006.tar.zst.partial").write_bytes(b"upload in progress")
    return episodes, index


def run(ctx: Context) -> ExitCode:
    out = ctx.stdout
    root = Path(tempfile.mkdtemp(prefix="cis490-demo-"))
    try:
        episodes, index = build(root)
        before = index.read_bytes()
        out.write(f"== demo store in {root}: 3 hosts, 14 tarballs\n")
        out.write(
            "   3 have no index row (one only a torn last line), 1 is truncated, 1 is still in flight;\n"
        )
        out.write(f"   index.jsonl: {len(before.splitlines())} lines, 1 of them garbage, the last one torn\n")
        out.write(f"== a pass (--min-age {SETTLE_S:g}), its JSON log events as journald gets them:\n")
        out.flush()
        cfg = config.build({"episodes_root": episodes, "index": index, "min_age": SETTLE_S, "state_dir": ""})
        with Reconciler(cfg, make_logger("info", out)) as reconciler:
            summary = reconciler.run_pass()
            after = index.read_bytes()
            if not after.startswith(before):
                raise SystemExit("demo: the index was rewritten; this is a bug")
            out.write("== bytes appended to index.jsonl:\n" + after[len(before) :].decode())
            out.write("== a second pass over the same store:\n")
            out.flush()
            os.utime(episodes / IN_FLIGHT)  # its upload goes on: in flight still, however slow the first pass
            again = reconciler.run_pass()
        out.write(
            f"== result: {summary.backfilled} rows backfilled, {summary.corrupt} corrupt tarball reported, "
            f"{summary.in_flight} left in flight, {summary.bad_index_lines} bad index lines "
            f"(the torn one, once ended, is one); second pass appended {again.backfilled}\n"
        )
    finally:
        if ctx.args.keep:
            out.write(f"== kept {root}\n")
        else:
            shutil.rmtree(root)
    return ExitCode.OK
