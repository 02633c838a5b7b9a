"""What a pass remembers for the next one, so a pass with nothing to do is cheap.

Two things are remembered, both only as hints that are checked before use:

- How far the index was parsed: its identity (device, inode), the offset,
  and a digest of the 4 KiB before that offset. The next pass parses only
  what was appended; a different identity, a shorter file or different bytes
  before the offset (the file was replaced or rewritten) mean a full parse,
  and a full listing of every host.
- For each host directory, its mtime and ctime when it was last listed, and
  the episodes it then left unresolved (in flight, unsettled, unreadable,
  corrupt, not yet committed). A directory whose mtime and ctime are
  unchanged has had no entry added, removed or renamed, so only the
  unresolved episodes need another look. Timestamps are coarse on some
  filesystems: a directory listed less than GUARD_NS after its mtime might
  change again within the same tick, so it is not remembered at all.

The keys the index covers are stored as IndexedKeys' 16-byte digests, so
the file is about 16 bytes per row. It is written atomically (temp file,
fsync, rename, fsync of the directory) after each completed pass. A file
that is unreadable, of another version, for another store, or fails its
checksum is ignored: the pass is then a full one and rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import syscalls
from .index import IndexedKeys, IndexReader
from .store import Tarball

MAGIC = b"cis490-reconcile state\n"
VERSION = 2
FILE_NAME = "state.bin"
LAST_PASS_FILE = "last_pass.json"  # the outcome of the last pass, for `status`
GUARD_NS = 3 * 10**9
TAIL_BYTES = 4096
_U64 = struct.Struct("<Q")


class StateInvalid(ValueError):
    """The state file cannot be used; the reason says why."""


@dataclass(frozen=True, slots=True)
class HostMemo:
    mtime_ns: int
    ctime_ns: int
    unresolved: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unverified:
    """A tarball found unverifiable, as it was then: it is not read again
    while it stays the same file under the same decoding limits."""

    host_id: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    limits: str  # verify.Decoding.key
    reason: str

    @classmethod
    def of(cls, t: Tarball, limits: str, reason: str) -> Unverified:
        return cls(t.host_id, t.dev, t.ino, t.size, t.mtime_ns, t.ctime_ns, limits, reason)

    def still(self, t: Tarball, limits: str) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns, self.limits) == (
            t.dev,
            t.ino,
            t.size,
            t.mtime_ns,
            t.ctime_ns,
            limits,
        )


@dataclass
class Snapshot:
    """Everything in the state file, as plain values."""

    episodes_root: str
    index_path: str
    index_dev: int
    index_ino: int
    index_offset: int
    index_lines: int
    index_bad_lines: int
    index_tail_sha256: str
    last_full_ns: int
    hosts: dict[str, HostMemo] = field(default_factory=dict)
    unverified: dict[str, Unverified] = field(default_factory=dict)
    keys: IndexedKeys = field(default_factory=IndexedKeys)


def tail_digest(fd: int, offset: int) -> str:
    start = max(0, offset - TAIL_BYTES)
    return hashlib.sha256(syscalls.pread_exact(fd, offset - start, start)).hexdigest()


def encode(snap: Snapshot) -> bytes:
    hi, lo, hostless = snap.keys.to_bytes()
    header = {k: v for k, v in asdict(snap).items() if k not in ("hosts", "keys", "unverified")}
    header["hosts"] = {h: [m.mtime_ns, m.ctime_ns, list(m.unresolved)] for h, m in snap.hosts.items()}
    header["unverified"] = {p: asdict(u) for p, u in snap.unverified.items()}
    header["hostless"] = hostless
    head = json.dumps(header, ensure_ascii=True).encode()
    body = b"".join(
        [
            MAGIC,
            _U64.pack(VERSION),
            _U64.pack(len(head)),
            head,
            _U64.pack(len(hi)),
            hi,
            _U64.pack(len(lo)),
            lo,
        ]
    )
    return body + hashlib.sha256(body).digest()


def decode(data: bytes) -> Snapshot:
    if not data.startswith(MAGIC):
        raise StateInvalid("not a state file")
    body, checksum = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != checksum:
        raise StateInvalid("checksum mismatch")
    pos = len(MAGIC)

    def take() -> bytes:
        nonlocal pos
        (n,) = _U64.unpack_from(body, pos)
        chunk = body[pos + 8 : pos + 8 + n]
        if len(chunk) != n:
            raise StateInvalid("truncated")
        pos += 8 + n
        return chunk

    (version,) = _U64.unpack_from(body, pos)
    if version != VERSION:
        raise StateInvalid(f"version {version}, expected {VERSION}")
    pos += 8
    try:
        header = json.loads(take())
        hosts = {
            h: HostMemo(int(m), int(c), tuple(map(str, u))) for h, (m, c, u) in header.pop("hosts").items()
        }
        unverified = {p: Unverified(**u) for p, u in header.pop("unverified").items()}
        keys = IndexedKeys.from_bytes(take(), take(), header.pop("hostless"))
        return Snapshot(**header, hosts=hosts, unverified=unverified, keys=keys)
    except (ValueError, TypeError, KeyError, struct.error) as e:
        raise StateInvalid(f"malformed: {e}") from None


def load(state_dir: Path) -> Snapshot | None:
    """The snapshot, or None when there is none yet. Raises StateInvalid."""
    try:
        data = (state_dir / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateInvalid(e.strerror or str(e)) from None
    return decode(data)


def save(state_dir: Path, snap: Snapshot) -> None:
    syscalls.write_atomic(state_dir / FILE_NAME, encode(snap))


def save_last_pass(state_dir: Path, record: dict[str, object]) -> None:
    syscalls.write_atomic(state_dir / LAST_PASS_FILE, json.dumps(record, sort_keys=True).encode() + b"\n")


def load_last_pass(state_dir: Path) -> dict[str, object] | None:
    """The last pass's record, or None when there is none or it is unreadable."""
    try:
        record = json.loads((state_dir / LAST_PASS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def resume_reader(snap: Snapshot, reader: IndexReader) -> bool:
    """Point `reader` at where the snapshot stopped, if the index is still
    the file it parsed (same identity, at least as long, same bytes before
    the offset). Returns False, leaving the reader alone, otherwise."""
    try:
        fd = os.open(reader.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (snap.index_dev, snap.index_ino) or st.st_size < snap.index_offset:
            return False
        if tail_digest(fd, snap.index_offset) != snap.index_tail_sha256:
            return False
    finally:
        os.close(fd)
    reader.resume(
        snap.keys, (snap.index_dev, snap.index_ino), snap.index_offset, snap.index_lines, snap.index_bad_lines
    )
    return True


class HostTracker:
    """One pass's view of the host directories; becomes the next pass's memos.

    Episodes start unresolved when the pass finds them unindexed and are
    resolved once their row is in the index (ours or the receiver's), or when
    they are gone. Whatever is still unresolved at the end is revisited by
    the next pass even if its directory looks unchanged."""

    def __init__(self, memos: dict[str, HostMemo], full: bool) -> None:
        self._old = {} if full else memos
        self._seen: dict[str, tuple[int, int, int]] = {}  # host -> (mtime, ctime, listed at)
        self._open: dict[str, set[str]] = {}
        self.unchanged = 0
        self.listed = 0

    def revisit_only(self, host_id: str, st: os.stat_result) -> tuple[str, ...] | None:
        """The episodes to look at again if the directory is unchanged, or
        None if it must be listed. Call before listing: a change during the
        listing then shows up as a different mtime next time."""
        self._seen[host_id] = (st.st_mtime_ns, st.st_ctime_ns, time.time_ns())
        memo = self._old.get(host_id)
        if memo is not None and (memo.mtime_ns, memo.ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns):
            self.unchanged += 1
            return memo.unresolved
        self.listed += 1
        return None

    def unresolved(self, host_id: str, episode_id: str) -> None:
        self._open.setdefault(host_id, set()).add(episode_id)

    def resolved(self, host_id: str, episode_id: str) -> None:
        self._open.get(host_id, set()).discard(episode_id)

    def memos(self, previous: dict[str, HostMemo], only_host: str | None) -> dict[str, HostMemo]:
        """Memos after a completed pass. Hosts this pass did not look at keep
        theirs when it was limited to one host, and are dropped otherwise."""
        memos = {h: m for h, m in previous.items() if only_host is not None and h != only_host}
        for host_id, (mtime_ns, ctime_ns, listed_ns) in self._seen.items():
            if listed_ns - mtime_ns >= GUARD_NS and listed_ns - ctime_ns >= GUARD_NS:
                memos[host_id] = HostMemo(mtime_ns, ctime_ns, tuple(sorted(self._open.get(host_id, ()))))
        return memos
