"""The `scale` figure: a pass costs what changed, not what the index remembers.

A receiver a year old: an index of N rows (default 8M; --scale shrinks it)
over 100 hosts whose tarballs were pruned by retention long ago, plus 2,000
real tarballs that no row names yet. With a fresh state directory, for N and
for 200k rows, in the same run:

- the full pass (the first one: it reads every row into the state database
  and backfills the 2,000) against the same-run reference, json.loads of
  every line of the N-row index;
- the no-op pass after it, and its flatness: wall at N over wall at 200k;
- status --json --retention 86400, against the same reference;
- scrub --retention 86400 (N rows only): every row is pruned, so it must
  exit 0 and stay quiet.

Each with wall time, peak RSS of any of its processes, and bytes written
(the kernel's count of bytes the processes dirtied, /proc/PID/io
write_bytes, reported by the wrapper from getrusage's ru_oublock). The bars
of the issue that asked for this are printed as goals.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import zstandard
from common import Bench, Figure, MiB, Run, goal, write_tarball

HOSTS = 100
TARBALLS = 2_000
SMALL = 200_000
RETENTION = "86400"


def _rows(path: Path, count: int, seed: str) -> None:
    """`count` receiver rows over HOSTS hosts, in time order over the year
    before last week (all older than the retention), about 280 bytes each."""
    rng = random.Random(seed)
    start = time.time() - 365 * 86400
    step = (358 * 86400) / max(count, 1)
    with path.open("w") as f:
        batch = []
        for i in range(count):
            row = {
                "received_at_wall": datetime.fromtimestamp(start + i * step, timezone.utc).isoformat(),
                "host_id": f"robot-{rng.randrange(HOSTS):03d}",
                "episode_id": f"ep-{i:09d}-{rng.getrandbits(32):08x}",
                "sha256": f"{rng.getrandbits(256):064x}",
                "size_bytes": rng.randrange(1 << 20, 1 << 30),
                "schema_version": 1,
            }
            batch.append(json.dumps(row, sort_keys=True) + "\n")
            if len(batch) == 50_000:
                f.write("".join(batch))
                batch = []
        f.write("".join(batch))


def corpus(root: Path, rows: int) -> Path:
    """The store of `rows` rows, generated once and reused (marked by corpus.json)."""
    d = root / f"scale-{rows}"
    marker = d / "corpus.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "tarballs": TARBALLS}:
        print(f"  scale {rows:,} rows: reused", flush=True)
        return d
    shutil.rmtree(d, ignore_errors=True)
    (d / "episodes").mkdir(parents=True)
    t0 = time.perf_counter()
    _rows(d / "index.pristine.jsonl", rows, f"scale-{rows}")
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    for i in range(TARBALLS):
        host = d / "episodes" / f"robot-{i % HOSTS:03d}"
        host.mkdir(exist_ok=True)
        write_tarball(host / f"new-{i:05d}.tar.zst", f"new-{i:05d}", 16 << 10, cctx)
    marker.write_text(json.dumps({"rows": rows, "tarballs": TARBALLS}))
    print(f"  scale {rows:,} rows: generated in {time.perf_counter() - t0:.1f} s", flush=True)
    return d


def parse_reference(index: Path) -> float:
    """json.loads of every line, 1 MiB reads: the cost the full pass is measured against."""
    t0 = time.perf_counter()
    with index.open("rb") as f:
        carry = b""
        while chunk := f.read(MiB):
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            for line in lines:
                json.loads(line)
    return time.perf_counter() - t0


def _facts(run: Run, printed: bool = False) -> str:
    text = f"{run.wall_s:.2f} s, {run.maxrss_mib:.1f} MiB, wrote {run.write_bytes / MiB:.2f} MiB"
    if printed and run.stdout is not None:
        text += f", printed {run.stdout.stat().st_size:,} B, exit {run.rc}"
    return text


def _printed(run: Run) -> int:
    return run.stdout.stat().st_size if run.stdout is not None else 0


class _Store:
    """One scale store, measured with a fresh state directory."""

    def __init__(self, b: Bench, d: Path) -> None:
        self.b = b
        self.index = d / "index.jsonl"
        shutil.copyfile(d / "index.pristine.jsonl", self.index)
        settled = time.time() - 3600
        for p in (d / "episodes").glob("*/*.tar.zst"):
            os.utime(p, (settled, settled))
        self.state = Path(tempfile.mkdtemp(prefix="state-", dir=b.root))
        self.where = ["--episodes-root", str(d / "episodes"), "--index", str(self.index)]
        self.where += ["--state-dir", str(self.state), "--min-age", "0", "--retention", RETENTION]

    def run(self, label: str, *args: str) -> Run:
        return self.b.measure(
            label, [sys.executable, "-m", "cis490_reconcile", *args, *self.where], ok=(0, 1)
        )

    def close(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)


def run_scale(b: Bench, scale: float) -> list[Figure]:
    rows = max(SMALL * 2, round(8_000_000 * scale))
    figs: list[Figure] = []
    noop: dict[int, float] = {}
    for n in (SMALL, rows):
        store = _Store(b, corpus(b.root, n))
        try:
            full = store.run(f"scale {n:,}: full pass", "--once")
            if full.finished.get("backfilled") != TARBALLS:
                print(f"    WARNING: the full pass backfilled {full.finished.get('backfilled')}", flush=True)
            quiet = store.run(f"scale {n:,}: no-op pass", "--once")
            noop[n] = quiet.wall_s
            status = store.run(f"scale {n:,}: status", "status", "--json")
            if n == SMALL:
                figs.append(
                    Figure(
                        f"scale {n:,} rows: full / no-op / status",
                        f"{_facts(full)} / {_facts(quiet)} / {_facts(status)}",
                    )
                )
                continue
            print("    json.loads of every line (the reference) ...", flush=True)
            ref = parse_reference(store.index)
            scrub = store.run(f"scale {n:,}: scrub", "scrub")
            size = (store.state / "state.sqlite3").stat().st_size
        finally:
            store.close()
        figs += [
            Figure(
                f"scale {n:,} rows: full pass",
                _facts(full),
                f"json.loads {ref:.1f} s",
                f"{full.wall_s / ref:.2f}",
                goal("<= 1.5x, <= 64 MiB", full.wall_s <= 1.5 * ref and full.maxrss_mib <= 64),
            ),
            Figure(
                f"scale {n:,} rows: no-op pass",
                _facts(quiet),
                goal=goal("<= 1 MiB written, <= 64 MiB", quiet.write_bytes <= MiB and quiet.maxrss_mib <= 64),
            ),
            Figure(
                f"scale {n:,} rows: status --json --retention 1d",
                _facts(status, printed=True),
                f"json.loads {ref:.1f} s",
                f"{status.wall_s / ref:.2f}",
                goal(
                    "<= 0.5x, <= 64 MiB, <= 1 MiB printed, exit 0",
                    status.wall_s <= 0.5 * ref
                    and status.maxrss_mib <= 64
                    and _printed(status) <= MiB
                    and status.rc == 0,
                ),
            ),
            Figure(
                f"scale {n:,} rows: scrub --retention 1d",
                _facts(scrub, printed=True),
                goal=goal(
                    "exit 0, <= 1 MiB printed, <= 64 MiB",
                    scrub.rc == 0 and _printed(scrub) <= MiB and scrub.maxrss_mib <= 64,
                ),
            ),
            Figure(f"scale {n:,} rows: state database", f"{size / MiB:.0f} MiB ({size / n:.1f} B a row)"),
        ]
    ratio = noop[rows] / noop[SMALL]
    figs.append(
        Figure(
            f"scale: no-op pass at {rows:,} over {SMALL:,} rows",
            f"{noop[rows]:.3f} s",
            f"{noop[SMALL]:.3f} s",
            f"{ratio:.2f}",
            goal("<= 1.5", ratio <= 1.5),
        )
    )
    return figs
