"""The `scale` figures: a pass, status and scrub cost what is live, not
what the index remembers.

A receiver years old: an index of N rows (8M by default; --rows 8M,32M,100M
for more, --scale shrinks the default) over 100 hosts whose tarballs were
pruned by retention long ago, plus 2,000 real tarballs that no row names
yet. With a fresh state directory, for 200k rows and for each N, in the
same run:

- the full pass (the first: it reads every row into the state database and
  backfills the 2,000) against json.loads of every line of the N-row index;
- the no-op pass after it, against `cis490-reconcile --version` (process
  start and imports) in the same run, taken in turns, the best of 3 each;
- status --json --retention 1d, against the same at 200k;
- scrub --retention 1d, twice: every row is pruned, so each must exit 0
  and stay quiet; the second round counts the pruned runs the first found
  without reading them, against the same at 200k;
- the state database's bytes a row.

Each with wall time, peak RSS of any of its processes, and bytes written
(the kernel's count of bytes the processes dirtied, getrusage's
ru_oublock). The bars of the issue that asked for this are the goals.
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

from cis490_reconcile.state import FILE_NAME

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


def corpus(root: Path, rows: int) -> tuple[Path, int]:
    """The store of `rows` rows, generated once and reused (marked by
    corpus.json), and its index's size as generated. The index is kept in
    one copy (at 100M rows it is 28 GB): each use truncates it back to that
    size, which drops exactly the whole lines the passes appended."""
    d = root / f"scale-{rows}"
    marker = d / "corpus.json"
    if marker.exists():
        known = json.loads(marker.read_text())
        if {k: known.get(k) for k in ("rows", "tarballs")} == {"rows": rows, "tarballs": TARBALLS}:
            print(f"  scale {rows:,} rows: reused", flush=True)
            return d, known["index_bytes"]
    shutil.rmtree(d, ignore_errors=True)
    (d / "episodes").mkdir(parents=True)
    t0 = time.perf_counter()
    _rows(d / "index.jsonl", rows, f"scale-{rows}")
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    for i in range(TARBALLS):
        host = d / "episodes" / f"robot-{i % HOSTS:03d}"
        host.mkdir(exist_ok=True)
        write_tarball(host / f"new-{i:05d}.tar.zst", f"new-{i:05d}", 16 << 10, cctx)
    size = (d / "index.jsonl").stat().st_size
    marker.write_text(json.dumps({"rows": rows, "tarballs": TARBALLS, "index_bytes": size}))
    print(f"  scale {rows:,} rows: generated in {time.perf_counter() - t0:.1f} s", flush=True)
    return d, size


def parse_reference(index: Path, label: str) -> float:
    """json.loads of every line, 1 MiB reads, in one thread: the cost the full
    pass is measured against."""
    print(f"  {label}: json.loads of every line (the reference) ...", flush=True)
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

    def __init__(self, b: Bench, d: Path, index_bytes: int) -> None:
        self.b = b
        self.index = d / "index.jsonl"
        os.truncate(self.index, index_bytes)  # the bench's own copy, back as generated
        settled = time.time() - 3600
        for p in (d / "episodes").glob("*/*.tar.zst"):
            os.utime(p, (settled, settled))
        # A pass trusts a host directory's memo only if it had not changed for 3 s when listed
        # (scan.GUARD_NS): with a corpus generated just now, every no-op pass would list them all.
        changed = max(host.stat().st_ctime for host in (d / "episodes").iterdir())
        time.sleep(max(0.0, changed + 3.5 - time.time()))
        self.state = Path(tempfile.mkdtemp(prefix="state-", dir=b.root))
        self.where = ["--episodes-root", str(d / "episodes"), "--index", str(self.index)]
        self.where += ["--state-dir", str(self.state), "--min-age", "0", "--retention", RETENTION]

    def run(self, label: str, *args: str) -> Run:
        return self.b.measure(
            label, [sys.executable, "-m", "cis490_reconcile", *args, *self.where], ok=(0, 1)
        )

    def close(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)


def parse_rows(text: str) -> int:
    """8M, 32M, 100M, 200k, or a plain number."""
    text = text.strip().lower()
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if factor > 1 else text) * factor)


def run_scale(b: Bench, scale: float, row_counts: list[int] | None = None) -> list[Figure]:
    counts = row_counts or [max(SMALL * 2, round(8_000_000 * scale))]
    figs: list[Figure] = []
    base: dict[str, float] = {}
    for n in (SMALL, *counts):
        store = _Store(b, *corpus(b.root, n))
        try:
            full = store.run(f"scale {n:,}: full pass", "--once")
            if full.finished.get("backfilled") != TARBALLS:
                print(f"    WARNING: the full pass backfilled {full.finished.get('backfilled')}", flush=True)
            os.sync()  # the full pass's writeback (1.9 GiB at 8M) would be timed as the no-op's
            version, quiet = _start_up(b, store, n)
            status = store.run(f"scale {n:,}: status", "status", "--json")
            first = store.run(f"scale {n:,}: scrub, first round", "scrub")
            scrub = store.run(f"scale {n:,}: scrub, second round", "scrub")
            size = (store.state / FILE_NAME).stat().st_size
            ref = None if n == SMALL else parse_reference(store.index, f"scale {n:,}")
        finally:
            store.close()
        if n == SMALL:
            base = {"status": status.wall_s, "scrub": scrub.wall_s}
        figs += _figures(n, full, quiet, version, status, first, scrub, size, ref, base)
    return figs


def _start_up(b: Bench, store: _Store, n: int) -> tuple[Run, Run]:
    """`--version` and the no-op pass in turns, the best of 3 each: runs of
    0.2 s on a shared VM vary by a third from one to the next."""
    runs: tuple[list[Run], list[Run]] = ([], [])
    for i in range(1, 4):
        cmd = [sys.executable, "-m", "cis490_reconcile", "--version"]
        runs[0].append(b.measure(f"scale {n:,}: --version {i}", cmd))
        runs[1].append(store.run(f"scale {n:,}: no-op pass {i}", "--once"))
    version, quiet = (min(each, key=lambda r: r.wall_s) for each in runs)
    return version, quiet


def _figures(
    n: int,
    full: Run,
    quiet: Run,
    version: Run,
    status: Run,
    first: Run,
    scrub: Run,
    size: int,
    ref: float | None,
    base: dict[str, float],
) -> list[Figure]:
    """The figures of one row count (at 200k: the bases the others are held to)."""

    def against_small(what: str, run: Run, key: str, times: float, text: str, met: bool) -> Figure:
        """`run` held to `times` the same command at 200k rows (at 200k: the base)."""
        if n == SMALL:
            return Figure(f"scale {n:,} rows: {what}", _facts(run, printed=True))
        ratio = run.wall_s / base[key]
        return Figure(
            f"scale {n:,} rows: {what}",
            _facts(run, printed=True),
            f"at 200k {base[key]:.2f} s",
            f"{ratio:.2f}",
            goal(f"<= {times:.1f}x, {text}", ratio <= times and met),
        )

    figs = [
        Figure(
            f"scale {n:,} rows: full pass",
            _facts(full),
            "-" if ref is None else f"json.loads {ref:.1f} s",
            "-" if ref is None else f"{full.wall_s / ref:.2f}",
            "-" if ref is None else goal("<= 1.0x, <= 64 MiB", full.wall_s <= ref and full.maxrss_mib <= 64),
        ),
        Figure(
            f"scale {n:,} rows: no-op pass",
            _facts(quiet),
            f"--version {version.wall_s:.3f} s",
            f"{quiet.wall_s / version.wall_s:.2f}",
            goal(
                "<= 1.3x, <= 1 MiB written", quiet.wall_s <= 1.3 * version.wall_s and quiet.write_bytes <= MiB
            ),
        ),
        against_small(
            "status --json --retention 1d", status, "status", 1.5, "<= 64 MiB", status.maxrss_mib <= 64
        ),
        Figure(f"scale {n:,} rows: scrub --retention 1d, first round", _facts(first, printed=True)),
        against_small(
            "scrub --retention 1d, second round",
            scrub,
            "scrub",
            2.0,
            "exit 0, <= 1 MiB printed",
            scrub.rc == first.rc == 0 and _printed(scrub) <= MiB,
        ),
        Figure(
            f"scale {n:,} rows: state database",
            f"{size / MiB:.0f} MiB ({size / n:.1f} B a row)",
            goal=goal("<= 40 B a row", size / n <= 40),
        ),
    ]
    return figs
