"""Real tarballs, real index files and real processes for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from cis490_reconcile import index
from cis490_reconcile.actions.demo import tar_bytes as tar_bytes
from cis490_reconcile.coverage import Coverage
from cis490_reconcile.state import FILE_NAME, Scratch, State
from cis490_reconcile.store import HostDir, Store, Tarball
from cis490_reconcile.verify import Decoding, Verdict, examine

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def zstd(data: bytes, checksum: bool = True, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=checksum).compress(data)


def meta(commit: object = COMMIT) -> bytes:
    return json.dumps({"code_version": {"commit": commit}, "robot": "r2"}).encode()


def episode(payload: bytes | None = None, commit: object = COMMIT) -> dict[str, bytes]:
    """Members of a typical episode: meta.json first, then data."""
    return {
        "ep/meta.json": meta(commit),
        "ep/frames.bin": payload if payload is not None else os.urandom(3000) * 3,
    }


@contextmanager
def _files(tool: str, members: dict[str, bytes], sparse: dict[str, list[tuple[int, bytes]]]) -> Iterator[str]:
    """A temporary directory holding `members`, and `sparse` files written as
    (offset, data) extents with holes between them, for `tool` to archive
    (the test skips when it is not installed)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install libarchive-tools)")
    with tempfile.TemporaryDirectory() as src:
        for name, data in members.items():
            target = Path(src, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for name, extents in sparse.items():
            target = Path(src, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                for offset, data in extents:
                    f.seek(offset)
                    f.write(data)
        yield src


def gnu_tarball(
    path: Path,
    members: dict[str, bytes],
    zstd_args: tuple[str, ...] = (),
    tar_args: tuple[str, ...] = (),
    sparse: dict[str, list[tuple[int, bytes]]] | None = None,
    tar: str = "tar",
) -> bytes:
    """A .tar.zst made the way a shipper's shell does: GNU tar (or `tar`:
    bsdtar) piped into the zstd CLI (`tar -cf - ... | zstd ARGS`). `sparse`
    adds files with holes, for `tar -S`."""
    with _files(tar, members, sparse or {}) as src:
        names = [*members, *(sparse or {})]
        tar_out = subprocess.Popen([tar, *tar_args, "-cf", "-", "-C", src, *names], stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-q", "-f", *zstd_args, "-o", str(path)], stdin=tar_out.stdout, check=True)
        assert tar_out.stdout is not None and tar_out.wait() == 0
        tar_out.stdout.close()
    return path.read_bytes()


def bsdtar_zstd(path: Path, members: dict[str, bytes], tar_args: tuple[str, ...] = ()) -> bytes:
    """A .tar.zst made by bsdtar alone (`bsdtar --zstd -cf`: libarchive's own
    zstd writer), as BSD and macOS shippers make them."""
    with _files("bsdtar", members, {}) as src:
        subprocess.run(["bsdtar", "--zstd", *tar_args, "-cf", str(path), "-C", src, *members], check=True)
    return path.read_bytes()


def permissions_apply(argv: list[str]) -> list[str]:
    """`argv` with file permissions checked even as root (which reads and
    searches anything): its DAC capabilities dropped with setpriv."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]


@contextmanager
def unsearchable(tmp_path: Path, name: str) -> Iterator[Path]:
    """A directory `name` under a parent this user may not search (mode 0;
    see permissions_apply for root), searchable again afterwards."""
    locked = tmp_path / "locked"
    (locked / name).mkdir(parents=True)
    locked.chmod(0)
    try:
        yield locked / name
    finally:
        locked.chmod(0o755)


def stock_members(episode_id: str, decoy: bool = False) -> dict[str, bytes]:
    """The episode's own meta.json, after a decoy *_meta.json when asked."""
    out = {f"{episode_id}/calib/sensor_meta.json": meta("f" * 40)} if decoy else {}
    return out | {f"{episode_id}/meta.json": meta(), f"{episode_id}/frames.bin": os.urandom(200_000)}


def train_dictionary(directory: Path) -> Path:
    """A dictionary trained by `zstd --train`, as a fleet would make one."""
    for i in range(300):
        (directory / f"s{i}.json").write_text(
            f'{{"robot": "r{i % 7}", "code_version": {{"commit": "{i:040x}"}}}}'
        )
    out = directory / "fleet.dict"
    samples = sorted(map(str, directory.glob("s*.json")))
    subprocess.run(
        ["zstd", "-q", "--train", *samples, "--maxdict=2048", "-o", str(out)], check=True, capture_output=True
    )
    return out


def stock_tarball(case: str, path: Path, episode_id: str, dictionary: Path) -> None:
    """A tarball as shippers make them with the stock tools (GNU tar piped
    into the zstd CLI), in one of the ways fleets run them."""
    sparse = {f"{episode_id}/sparse.bin": [(i * 65536, b"x" * 100) for i in range(40)]}
    members = stock_members
    makers: dict[str, Callable[[], object]] = {
        "long27": lambda: gnu_tarball(path, members(episode_id), ("--long=27",)),
        "long31": lambda: gnu_tarball(path, members(episode_id), ("--long=31",)),
        "long31-2G": lambda: gnu_tarball(path, members(episode_id), ("--long=31",)),
        "ultra22": lambda: gnu_tarball(path, members(episode_id), ("--ultra", "-22")),
        "dict": lambda: gnu_tarball(path, members(episode_id), ("-D", str(dictionary))),
        "dict-configured": lambda: gnu_tarball(path, members(episode_id), ("-D", str(dictionary))),
        "long27-cut": lambda: path.write_bytes(
            gnu_tarball(path, members(episode_id), ("--long=27",))[: path.stat().st_size // 2]
        ),
        "sparse-gnu": lambda: gnu_tarball(path, members(episode_id), (), ("-S", "--format=gnu"), sparse),
        "sparse-pax": lambda: gnu_tarball(path, members(episode_id), (), ("-S", "--format=posix"), sparse),
        "decoy-meta": lambda: gnu_tarball(path, members(episode_id, decoy=True)),
        "bsdtar-pax": lambda: gnu_tarball(
            path, members(episode_id), ("-19",), ("--format=pax",), tar="bsdtar"
        ),
        "bsdtar-zstd": lambda: bsdtar_zstd(path, members(episode_id), ("--format=gnutar",)),
        "bsdtar-zstd-cut": lambda: path.write_bytes(bsdtar_zstd(path, members(episode_id))[:-100]),
    }
    path.parent.mkdir(exist_ok=True)
    makers[case]()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    events: list[dict] = field(default_factory=list)

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]

    def one(self, event: str) -> dict:
        found = self.named(event)
        assert len(found) == 1, (event, self.stdout, self.stderr)
        return found[0]


def verdict_of(data: bytes, decoding: Decoding | None = None, episode_id: str = "ep") -> Verdict:
    """What `examine` says of these bytes, read from a real file."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return examine(f.fileno(), len(data), episode_id, decoding)[0]


def parse_events(text: str) -> list[dict]:
    """Every line must be one JSON object: that is the logging contract."""
    return [json.loads(line) for line in text.splitlines() if line]


class Receiver:
    """A receiver's store in a temp dir: episodes/<host>/<id>.tar.zst and index.jsonl."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.episodes = root / "episodes"
        self.index = root / "index.jsonl"
        self.episodes.mkdir()

    def tarball(
        self,
        host: str,
        episode_id: str,
        members: dict[str, bytes] | None = None,
        *,
        gnu: bool = False,
        checksum: bool = True,
        blob: bytes | None = None,
    ) -> Path:
        path = self.episodes / host / f"{episode_id}.tar.zst"
        path.parent.mkdir(exist_ok=True)
        members = episode() if members is None else members
        if blob is not None:
            path.write_bytes(blob)
        elif gnu:
            gnu_tarball(path, members)
        else:
            path.write_bytes(zstd(tar_bytes(members), checksum=checksum))
        return path

    def receiver_row(self, host: str, episode_id: str, **extra: object) -> dict:
        """The row the receiver would have written for a tarball on disk."""
        import hashlib

        path = self.episodes / host / f"{episode_id}.tar.zst"
        data = path.read_bytes()
        row = {
            "received_at_wall": "2026-11-01T00:00:00+00:00",
            "host_id": host,
            "episode_id": episode_id,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "schema_version": 1,
        }
        row.update(extra)
        return row

    def append_raw(self, data: bytes) -> None:
        with open(self.index, "ab") as f:
            f.write(data)

    def append_row(self, row: dict) -> None:
        self.append_raw((json.dumps(row, sort_keys=True) + "\n").encode())

    def replace_index(self) -> None:
        """The same bytes under another inode (a restore, a copy renamed over it)."""
        copy = self.index.with_name("index.copy")
        copy.write_bytes(self.index.read_bytes())
        os.replace(copy, self.index)

    def lines(self) -> list[bytes]:
        """The index's lines; none when there is no index (a pass with nothing
        to append leaves it to the receiver)."""
        return self.index.read_bytes().splitlines() if self.index.exists() else []

    def rows(self) -> list[dict]:
        """Every non-blank line of the index as JSON (fails on a bad line)."""
        return [json.loads(line) for line in self.lines() if line.strip()]

    def keys(self) -> list[tuple[str | None, str]]:
        return [(r.get("host_id"), r["episode_id"]) for r in self.rows()]

    def keys_lenient(self) -> list[tuple[str | None, str]]:
        """Keys of the lines that are rows, skipping garbage (a write cut short
        by a full disk leaves one line that is not a row)."""
        keys = []
        for line in self.lines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "episode_id" in row:
                keys.append((row.get("host_id"), row["episode_id"]))
        return keys

    def last_pass(self, state_dir: Path) -> dict | None:
        """The last pass's record in `state_dir`, as `status --json` shows it."""
        argv = self.argv("--json", "--state-dir", str(state_dir), command="status")
        status = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env())
        assert status.returncode in (0, 1) and status.stderr == "", status.stderr
        record: dict | None = json.loads(status.stdout)["last_pass"]
        return record

    def argv(self, *args: str, min_age: float = 0, command: str | None = None) -> list[str]:
        """The command line of a pass (or of `command`: status, scrub) on this store."""
        return [
            sys.executable,
            "-m",
            "cis490_reconcile",
            *([command] if command else []),
            "--episodes-root",
            str(self.episodes),
            "--index",
            str(self.index),
            "--min-age",
            str(min_age),
            *args,
        ]

    def run(self, *args: str, min_age: float = 0, timeout: float = 60, once: bool = True) -> Result:
        """Run the real command in a subprocess; parse its stdout as events
        (stderr for --dry-run, whose stdout holds rows)."""
        argv = self.argv(*(("--once",) if once else ()), *args, min_age=min_age)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        log = proc.stderr if "--dry-run" in args else proc.stdout
        events = parse_events(log) if proc.returncode in (0, 1) else []
        return Result(proc.returncode, proc.stdout, proc.stderr, events)

    def copy(self, dest: Path) -> Receiver:
        shutil.copytree(self.root, dest, symlinks=True)
        twin = Receiver.__new__(Receiver)
        twin.root, twin.episodes, twin.index = dest, dest / "episodes", dest / "index.jsonl"
        return twin


def recounted(receiver: Receiver, directory: Path) -> Path:
    """A state directory made from nothing by reading the whole index: what
    the state of any history must equal."""
    directory.mkdir()
    with contextlib.closing(
        State.open(directory / FILE_NAME, str(receiver.episodes), str(receiver.index))
    ) as st:
        fd = index.open_for_reading(receiver.index)  # None: no index (yet), no rows
        try:
            Coverage(st).catch_up(fd, full=True)
        finally:
            if fd is not None:
                os.close(fd)
    return directory


def zero_page(path: Path, table: str) -> None:
    """The page of a state database that holds a small table (its root),
    gone to zeros: damage SQLite finds only when that table is read."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        (size,) = db.execute("PRAGMA page_size").fetchone()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(bytes(size))


def scratch_left(state_dir: Path) -> list[str]:
    """The scratch files of a rebuild on two processes that are there."""
    return [p for p in Scratch.beside(state_dir / FILE_NAME) if os.path.exists(p)]


def state_contents(state_dir: Path) -> dict[str, list[tuple]]:
    """What a state database knows of the index, by host name: the keys, the
    checkpoint's position, the bad line examples, and the counts kept with
    the keys (each host's keys and duplicates, its keys by hour and day
    received), after checking that those counts are what its keys say."""
    with contextlib.closing(sqlite3.connect(state_dir / FILE_NAME)) as db:
        named = "JOIN hosts h ON h.id = t.host"
        found = {
            "keys": f"SELECT h.name, t.digest, t.offset, t.received, t.copies FROM keys t {named}",
            "checkpoint": "SELECT index_ino, offset, lines, bad_lines, tail_sha256 FROM checkpoint",
            "bad_lines": "SELECT * FROM bad_lines",
            "counts": "SELECT name, keys, duplicates FROM hosts WHERE keys OR duplicates",
            "hours": f"SELECT h.name, t.hour, t.keys FROM received_hours t {named}",
            "days": f"SELECT h.name, t.day, t.keys FROM received_days t {named}",
        }
        contents = {what: sorted(db.execute(sql)) for what, sql in found.items()}
        recount = {
            "counts": f"SELECT h.name, count(*), sum(t.copies) - count(*) FROM keys t {named} GROUP BY 1",
            "hours": f"SELECT h.name, max(t.received, 0) / 3600, count(*) FROM keys t {named} "
            "WHERE t.received NOTNULL GROUP BY 1, 2",
            "days": f"SELECT h.name, max(t.received, 0) / 86400, count(*) FROM keys t {named} "
            "WHERE t.received NOTNULL GROUP BY 1, 2",
        }
        for what, sql in recount.items():
            assert contents[what] == sorted(db.execute(sql)), f"{what} kept != {what} recounted from the keys"
    return contents


def _tree_rss(root: int) -> tuple[int, int]:
    """(largest RSS of one process, sum of RSS) over `root` and its
    descendants, in bytes, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    sizes = []
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                sizes += [int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:")]
        except OSError:
            continue
    return max(sizes, default=0), sum(sizes)


def measure_rss(args: list[str], timeout: float = 120) -> tuple[Result, int, int]:
    """Run the command with `args`; return its result, the peak RSS of its
    largest process (getrusage, exact) and the peak of the sum over its
    process tree (sampled from /proc every 10 ms), in bytes."""
    import time

    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    argv = [sys.executable, "-c", wrapper, sys.executable, "-m", "cis490_reconcile", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pass = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        peak_pass = max(peak_pass, _tree_rss(proc.pid)[1])
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=5)
    lines = stderr.splitlines()
    peak_process = int(lines[-1]) << 10
    result = Result(proc.returncode, stdout, "\n".join(lines[:-1]), parse_events(stdout))
    return result, peak_process, peak_pass


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET.
    A thread records every datagram with its arrival time, so cadence can be
    asserted on what was received rather than on what was sent."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading
        import time

        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._clock = time.monotonic
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            for field_ in data.decode().split("\n"):
                self.messages.append((self._clock(), field_))

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._sock.close()

    def fields(self) -> list[str]:
        return [m for _, m in self.messages]

    def times(self, field_: str) -> list[float]:
        return [t for t, m in self.messages if m == field_]

    def statuses(self) -> list[str]:
        return [m.removeprefix("STATUS=") for m in self.fields() if m.startswith("STATUS=")]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment (already isolated by conftest) without
    anything systemd would set, plus `extra`."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


@contextmanager
def as_verified(receiver: Receiver, host_id: str, episode_id: str) -> Iterator[tuple[HostDir, Tarball]]:
    """The host directory open and the tarball as a pass saw it."""
    with Store(receiver.episodes) as store:
        host = store.open_host(host_id)
        assert isinstance(host, HostDir)
        with host:
            seen = host.lstat(episode_id)
            assert isinstance(seen, Tarball)
            yield host, seen


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `mount` (needs root): a small disk to
    fill, or another filesystem."""
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


class LockHolder:
    """Another process (tests/lockholder.py) holding an exclusive lock of one
    family (flock, lockf or ofd) on a file, as a receiver would, until
    `release` or the end of a with block."""

    def __init__(self, path: Path, family: str = "lockf") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "lockholder.py"), str(path), family],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "locked\n"

    def release(self) -> None:
        """Close its stdin (it exits); kill it if it does not."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)

    def __enter__(self) -> LockHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class TarfileEnding(tarfile.TarInfo):
    """tarfile's member class, recording how the member list ended (stream
    mode does not tell): tar.ending is the outermost header error, set last.
    tarfile is the oracle TarStream is tested and measured against."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> TarfileEnding:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.ending = type(e)  # type: ignore[attr-defined]
            raise
