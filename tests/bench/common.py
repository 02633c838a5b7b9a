"""What every benchmark shares: real corpora of .tar.zst files, the command
under test run as a black box under a timing wrapper, and the figure table.

The wrapper runs one command and reports its wall time (process start
included), the peak RSS of any of its processes (getrusage RUSAGE_CHILDREN:
the main process and its forked workers), their CPU time, and the bytes they
wrote (ru_oublock, the kernel's /proc/PID/io write_bytes, in 512-byte units).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import zstandard

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
NAMES = ("large", "many", "noop", "lock", "status", "scrub", "scale")

# 16 symbols: about 4 bits of entropy per byte, so zstd -3 compresses the payload about 2x and really
# has to decode Huffman-coded literals (unlike zeros or incompressible bytes).
_HEX = bytes(b"0123456789abcdef"[i & 15] for i in range(256))

# Runs one command and reports its wall time (process start included) and the peak RSS of any of its
# processes. Its own interpreter start is not timed; RUSAGE_CHILDREN excludes the wrapper itself.
_WRAPPER = """\
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "maxrss_kib": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime,
               "write_bytes": ru.ru_oublock * 512}, f)
"""


# ---------------------------------------------------------------------------------------------- corpora


class _RandomHex:
    """A file-like payload of ``size`` bytes over a 16-symbol alphabet, made as it is read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        self.left -= n
        return os.urandom(n).translate(_HEX)


def write_tarball(path: Path, episode_id: str, payload_size: int, cctx: zstandard.ZstdCompressor) -> None:
    """meta.json, then one payload member, streamed through zstd (level 3, content checksum)."""
    commit = hashlib.sha1(episode_id.encode()).hexdigest()
    meta = json.dumps({"episode_id": episode_id, "code_version": {"commit": commit}}).encode()
    with (
        path.open("wb") as f,
        cctx.stream_writer(f, closefd=False) as zw,
        tarfile.open(fileobj=zw, mode="w|", copybufsize=MiB) as tar,
    ):
        now = time.time()
        for name, size, src in (
            (f"{episode_id}/meta.json", len(meta), io.BytesIO(meta)),
            (f"{episode_id}/payload.bin", payload_size, _RandomHex(payload_size)),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, int(now), 0o644
            tar.addfile(info, src)


def _row(path: Path, host: str, episode_id: str) -> str:
    """The receiver's row for a tarball, exactly as README's contract has it."""
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    row = {
        "received_at_wall": datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
        "host_id": host,
        "episode_id": episode_id,
        "sha256": h.hexdigest(),
        "size_bytes": st.st_size,
        "schema_version": 1,
    }
    return json.dumps(row, sort_keys=True) + "\n"


def _gen_chunk(root: str, host: str, ids: list[str], payload_size: int, indexed: list[bool]) -> list[str]:
    """Write tarballs ``ids`` of ``host``; return the index lines of those marked indexed."""
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    hostdir = Path(root) / host
    hostdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for episode_id, is_indexed in zip(ids, indexed, strict=True):
        path = hostdir / f"{episode_id}.tar.zst"
        write_tarball(path, episode_id, payload_size, cctx)
        if is_indexed:
            lines.append(_row(path, host, episode_id))
    return lines


@dataclass
class Corpus:
    name: str
    dir: Path
    hosts: int
    count: int
    payload: int
    indexed_fraction: float

    @property
    def episodes(self) -> Path:
        return self.dir / "episodes"

    @property
    def pristine_index(self) -> Path:
        return self.dir / "index.pristine.jsonl"

    @property
    def index(self) -> Path:
        return self.dir / "index.jsonl"

    @property
    def unindexed(self) -> int:
        return self.count - round(self.count * self.indexed_fraction)

    def params(self) -> dict[str, object]:
        return {
            "hosts": self.hosts,
            "count": self.count,
            "payload": self.payload,
            "indexed_fraction": self.indexed_fraction,
        }

    def describe(self) -> str:
        what = f"{self.count:,} tarballs of {size_text(self.payload)} payload"
        return f"{self.name}: {what} on {self.hosts} hosts, {self.indexed_fraction:.0%} indexed"

    def tarballs(self, root: Path | None = None) -> list[Path]:
        return sorted((root or self.episodes).glob("*/*.tar.zst"))


def _estimate_disk(c: Corpus) -> int:
    per_file = (c.payload // 2 + 2 * KiB + 4 * KiB - 1) // (4 * KiB) * 4 * KiB  # ~2x, 4 KiB blocks
    return c.count * (per_file + 300)


def ensure_corpus(c: Corpus, gen_times: dict[str, str]) -> None:
    """Generate the corpus unless a complete one with the same parameters is there; note the time."""
    marker = c.dir / "corpus.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("params") == c.params():
            msg = f"reused ({bytes_on_disk(c.dir)}; generated in {done['gen_s']:.1f} s earlier)"
            print(f"  {c.describe()}: {msg}", flush=True)
            gen_times[c.name] = f"{done['gen_s']:.1f} s (reused)"
            return
    if c.dir.exists():
        shutil.rmtree(c.dir)
    need = _estimate_disk(c)
    free = shutil.disk_usage(c.dir.parent).free
    if need > free - 2 * GiB:
        raise SystemExit(f"not enough disk for {c.name}: need ~{size_text(need)}, {size_text(free)} free")
    c.episodes.mkdir(parents=True)
    print(f"  {c.describe()}: generating (~{size_text(need)}) ...", end="", flush=True)
    t0 = time.perf_counter()
    rng = random.Random(f"cis490-bench-{c.name}")
    names = [(f"h{i % c.hosts:02d}", f"ep-{c.name}-{i:07d}") for i in range(c.count)]
    indexed = set(rng.sample(range(c.count), round(c.count * c.indexed_fraction)))
    chunk = max(1, min(500, (64 * MiB) // max(c.payload, 1)))
    by_host: dict[str, list[tuple[str, bool]]] = {}
    for i, (host, ep) in enumerate(names):
        by_host.setdefault(host, []).append((ep, i in indexed))
    jobs = []
    for host, eps in sorted(by_host.items()):
        for s in range(0, len(eps), chunk):
            part = eps[s : s + chunk]
            jobs.append((host, [e for e, _ in part], [x for _, x in part]))
    lines: list[str] = []
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1) as ex:
        futs = [ex.submit(_gen_chunk, str(c.episodes), h, ids, c.payload, idx) for h, ids, idx in jobs]
        for fut in futs:
            lines.extend(fut.result())
    rng.shuffle(lines)  # the receiver's rows arrive interleaved from all hosts
    c.pristine_index.write_text("".join(lines))
    os.sync()
    gen_s = time.perf_counter() - t0
    marker.write_text(json.dumps({"params": c.params(), "gen_s": gen_s}))
    print(f" {gen_s:.1f} s, {bytes_on_disk(c.dir)}", flush=True)
    gen_times[c.name] = f"{gen_s:.1f} s"


def bytes_on_disk(path: Path) -> str:
    out = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()
    return out[0] if out else "?"


def reset_index(c: Corpus, index: Path | None = None) -> None:
    """Back to the corpus' initial index (deleted when nothing was indexed): a new file each time."""
    index = index or c.index
    index.unlink(missing_ok=True)
    if c.pristine_index.exists() and c.pristine_index.stat().st_size:
        shutil.copyfile(c.pristine_index, index)


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(MiB), b""))


# ---------------------------------------------------------------------------------------------- measuring


def warm(paths: Iterable[Path]) -> None:
    """Read files into the page cache (our pass drops what it read from the disk: POSIX_FADV_DONTNEED)."""
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.read(MiB):
                pass


def hash_floor(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        h = hashlib.sha256()
        with p.open("rb", buffering=0) as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        h.hexdigest()
    return time.perf_counter() - t0


def decode_floor(paths: list[Path]) -> float:
    """What one verify must at least do, in one thread: sha256 of the file and zstd-decode all of it."""
    hashing = hash_floor(paths)
    t0 = time.perf_counter()
    for p in paths:
        with p.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_size=MiB) as r:
            while r.read(MiB):
                pass
    return hashing + time.perf_counter() - t0


def parallel_decode_floor(paths: list[Path], n: int) -> float:
    """decode_floor's work split over n forked processes at once: what n cores give in fact (on a VM,
    two busy vCPUs are not always twice one)."""
    t0 = time.perf_counter()
    pids = []
    for k in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                decode_floor(paths[k::n])
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    if any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids):
        raise RuntimeError("a decode floor process failed")
    return time.perf_counter() - t0


@dataclass
class Run:
    label: str
    rc: int
    wall_s: float
    maxrss_mib: float
    cpu_s: float
    events: list[dict] = field(default_factory=list)
    stdout: Path | None = None
    write_bytes: int = 0

    def event(self, name: str) -> dict:
        for e in reversed(self.events):
            if e.get("event") == name:
                return e
        return {}

    @property
    def finished(self) -> dict:
        return self.event("pass_finished")

    def wall_text(self, event: str = "pass_finished", what: str = "pass") -> str:
        """The wall time (process start included), and the run's own ``duration_s`` in parentheses."""
        d = self.event(event).get("duration_s")
        return f"{secs_text(self.wall_s)}" + (
            f" ({what} {secs_text(d)})" if isinstance(d, int | float) else ""
        )

    def describe(self) -> str:
        f = self.finished
        keys = ("scanned", "already_indexed", "backfilled", "corrupt", "bytes_read", "duration_s")
        facts = ", ".join(f"{k}={f[k]}" for k in keys if k in f)
        return (
            f"    {self.label}: wall {self.wall_s:.3f} s, cpu {self.cpu_s:.2f} s, "
            f"peak RSS {self.maxrss_mib:.1f} MiB, rc {self.rc}; {facts}"
        )


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        empty = root / "empty-config.toml"
        empty.touch()
        # PYTHONDONTWRITEBYTECODE (set on some dev machines) would leave stale .pyc files,
        # and every run would compile the edited modules again; `pip install` of a wheel
        # compiles them once, so measure what an installed copy costs.
        drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "PYTHONDONTWRITEBYTECODE")
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("CIS490_RECONCILE_") and k not in drop
        }
        self.env["CIS490_RECONCILE_CONFIG"] = str(empty)
        package = Path(__file__).resolve().parents[2] / "cis490_reconcile"
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, env=self.env)
        self.help = subprocess.run(
            [sys.executable, "-m", "cis490_reconcile", "--help"], capture_output=True, text=True, env=self.env
        ).stdout

    def measure(self, label: str, cmd: list[str], ok: tuple[int, ...] = (0,)) -> Run:
        """Run ``cmd`` under the wrapper; an exit status not in ``ok`` raises RuntimeError."""
        slug = "".join(ch if ch.isalnum() else "-" for ch in label)
        out, err, res = (self.logs / f"{slug}.{x}" for x in ("stdout", "stderr", "rusage.json"))
        with out.open("wb") as o, err.open("wb") as e:
            subprocess.run(
                [sys.executable, "-c", _WRAPPER, str(res), *cmd],
                stdout=o,
                stderr=e,
                env=self.env,
                cwd=self.root,
                check=True,
            )
        r = json.loads(res.read_text())
        events = []
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
        run = Run(
            label, r["rc"], r["wall_s"], r["maxrss_kib"] / 1024, r["cpu_s"], events, out, r["write_bytes"]
        )
        print(run.describe(), flush=True)
        if run.rc not in ok:
            tail = err.read_text(errors="replace")[-2000:] + out.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{label}: exit {run.rc}\n{tail}")
        return run

    def ours(self, label: str, c: Corpus, *extra: str, index: Path | None = None) -> Run:
        cmd = [sys.executable, "-m", "cis490_reconcile", "--once", "--min-age", "0", "--lock-timeout", "60"]
        cmd += ["--episodes-root", str(c.episodes), "--index", str(index or c.index), *extra]
        return self.measure(label, cmd)

    def supports(self, subcommand: str) -> bool:
        """Whether this build has ``subcommand`` (its ``--help`` exits 0)."""
        cmd = [sys.executable, "-m", "cis490_reconcile", subcommand, "--help"]
        return subprocess.run(cmd, capture_output=True, env=self.env).returncode == 0


@dataclass
class Figure:
    figure: str
    ours: str
    reference: str = "-"
    ratio: str = "-"
    goal: str = "-"


def size_text(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def secs_text(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s:.3f} s"


def goal(text: str, met: bool | None) -> str:
    if met is None:
        return text
    return f"{text}: {'met' if met else 'MISSED'}"
