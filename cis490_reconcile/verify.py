"""Verifying one tarball: read it once, prove it complete and intact.

One pass over the bytes on disk feeds three checks, with memory bounded by
small buffers (and the zstd window a frame declares) whatever the size of
the file or of any member:

    file --read--> sha256 (of the bytes on disk, for the row)
             \\--> FrameWalker (zstd frame structure: is the file complete?)
             \\--> zstandard stream_reader --> tarfile "r|" --> meta.json

Why all three: zstandard's streaming reader reports no error when a file is
cut short, and tarfile in stream mode reports none when the cut falls on a
member boundary. A frame cut anywhere leaves FrameWalker short of the frame's
last block (and of its checksum, when the frame has one). The decoder
rejects corrupt blocks and checksum mismatches. tarfile rejects headers with
a bad checksum, and _GuardedTarInfo records how the archive ended, so an
archive without its end-of-archive block (a `tar | zstd` whose tar died) is
caught too. A bit flip inside member data of a frame WITHOUT a content
checksum is the one corruption nothing here can see.

Three verdicts come out of the bytes (two more, Unsettled and Unreadable,
from the file moving or failing to read):

- Intact: complete, decodes, a whole tar archive. It may be indexed.
- Corrupt: the bytes are damaged: cut short, a checksum mismatch, not zstd,
  not a tar, garbage after the last frame, empty. Structure wins: a file
  whose frames are cut short is corrupt even if it also needs a dictionary.
- Unverifiable: the bytes may be fine but cannot be checked here: a frame
  declares a window over the limit, needs a dictionary that is not
  configured, sets a header bit this decoder does not know, or a tar member's
  headers exceed HEADER_MAX_BYTES. Never indexed, never quarantined.

Memory follows the window each frame declares (zstd allocates it and touches
it only as far as the content goes). Windows up to FREE_WINDOW (what zstd
levels 1-19 use) decode freely; a larger one first takes its size from a
WindowBudget shared by all workers, so several workers never hold several
128 MiB windows at once (see workers.plan_memory).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import zstandard

from . import syscalls, zstdframe
from .config import Config, load_dictionaries
from .reading import READ_SIZE, HashingReader
from .runtime import human_size
from .store import HostDir, NotRegularFile, Store, Tarball

_TAR_BUFSIZE = 64 << 10  # decompressed bytes per tarfile read
META_MAX_BYTES = 1 << 20
HEADER_MAX_BYTES = 1 << 20  # all header bytes of one tar member: pax, long names, sparse maps
FREE_WINDOW = 8 << 20  # zstd levels 1-19 need at most this; larger windows are budgeted
WORKER_MEMORY = 64 << 20  # what one verifying process may need besides a budgeted window
DEFAULT_MAX_WINDOW = 128 << 20  # what `zstd -d` accepts without --memory or --long
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")


class Corrupt(Exception):
    """The bytes are damaged: the file can never become a valid episode
    tarball as it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unverifiable(Exception):
    """The bytes may be fine, but this configuration cannot check them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- what the decoder may use ----------------------------------------------------


class WindowBudget(Protocol):
    """Bytes of large zstd windows that may be decoded at once."""

    def reserve(self, n: int, wait: Callable[[], None]) -> None: ...

    def release(self, n: int) -> None: ...


class Unshared:
    """The budget of a process that verifies one tarball at a time: a
    reservation always fits."""

    def reserve(self, n: int, wait: Callable[[], None]) -> None:
        pass

    def release(self, n: int) -> None:
        pass


@dataclass
class Decoding:
    """Limits and dictionaries for decoding, fixed for a pass."""

    max_window: int = DEFAULT_MAX_WINDOW  # frames declaring more are unverifiable
    dictionaries: Mapping[int, bytes] = field(default_factory=dict)  # by dictionary id
    limited_by: str = "max_window"  # what set max_window, for the reason
    budget: WindowBudget = field(default_factory=Unshared)
    _loaded: dict[int, zstandard.ZstdCompressionDict] = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """Identifies the limits: a tarball found unverifiable under other
        limits is worth another look."""
        return f"window={self.max_window};dictionaries={','.join(map(str, sorted(self.dictionaries)))}"

    def refuse(self, frame: zstdframe.FrameHeader, first_dict: int | None = None) -> str | None:
        """Why this frame cannot be decoded here, or None."""
        if frame.reserved_bit:
            return "a zstd frame header sets a reserved bit (a format feature this decoder lacks)"
        if frame.window > self.max_window:
            return (
                f"a zstd frame declares a {human_size(frame.window)} window, over "
                f"{self.limited_by} ({human_size(self.max_window)})"
            )
        if frame.dict_id and frame.dict_id not in self.dictionaries:
            return f"a zstd frame needs dictionary {frame.dict_id}, which zstd_dictionaries does not name"
        if first_dict is not None and frame.dict_id not in (0, first_dict):
            return "zstd frames use more than one dictionary"
        return None

    def decoder(self, dict_id: int, window: int) -> zstandard.ZstdDecompressor:
        if not dict_id:
            return zstandard.ZstdDecompressor(max_window_size=window)
        if dict_id not in self._loaded:
            self._loaded[dict_id] = zstandard.ZstdCompressionDict(self.dictionaries[dict_id])
        return zstandard.ZstdDecompressor(dict_data=self._loaded[dict_id], max_window_size=window)

    @contextmanager
    def reserved(self, window: int, wait: Callable[[], None]) -> Iterator[int]:
        """The window size the decoder may use: windows up to FREE_WINDOW
        need no reservation, larger ones take theirs from the budget."""
        if window <= FREE_WINDOW:
            yield FREE_WINDOW
            return
        self.budget.reserve(window, wait)
        try:
            yield window
        finally:
            self.budget.release(window)


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    workers: int
    max_window: int
    limited_by: str  # "max_window", or the memory limit that lowered it


def plan_memory(workers: int, max_window: int, limit: int | None) -> MemoryPlan:
    """Workers and window limit that fit `limit` bytes (None: no limit).

    Every worker (and the main process) is counted at WORKER_MEMORY: the
    interpreter, the read and tar buffers and a window up to FREE_WINDOW.
    Larger windows share one budget of max_window bytes, so a pass needs at
    most WORKER_MEMORY * (workers + 1) + max_window. To fit the cgroup's
    limit (a unit's MemoryMax=) it first runs fewer workers; if even one does
    not fit, it lowers the window limit, past which a frame is unverifiable
    rather than a reason for the kernel to kill the pass."""
    if limit is None:
        return MemoryPlan(workers, max_window, "max_window")
    while workers > 1 and WORKER_MEMORY * (workers + 1) + max_window > limit:
        workers -= 1
    room = limit - WORKER_MEMORY * (workers + 1)
    if max_window <= room:
        return MemoryPlan(workers, max_window, "max_window")
    return MemoryPlan(workers, max(room, FREE_WINDOW), f"the memory limit of {limit >> 20} MiB")


def decoding_for(cfg: Config, workers: int) -> tuple[MemoryPlan, Decoding]:
    """The memory plan and the decoding limits of a pass with `workers`
    (config.check_paths has already vetted the dictionaries)."""
    plan = plan_memory(workers, cfg.max_window, syscalls.memory_limit())
    return plan, Decoding(plan.max_window, load_dictionaries(cfg.zstd_dictionaries), plan.limited_by)


# --- the single read ----------------------------------------------------------


# --- tar ----------------------------------------------------------------------


class _OverBound(Exception):
    """A tar member's headers are larger than we are willing to hold."""


class _HeaderBudget:
    """tarfile's fileobj while one member's headers are parsed. tarfile reads
    pax and GNU long-name payloads, GNU sparse extension blocks and sparse
    maps wholly into memory: count those reads and stop past
    HEADER_MAX_BYTES (a few KB of zstd can claim gigabytes of header)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self._left = HEADER_MAX_BYTES + 4 * tarfile.BLOCKSIZE  # the header blocks themselves

    def read(self, size: int = -1) -> bytes:
        self._left -= size
        if size < 0 or self._left < 0:
            raise _OverBound(f"the headers of a tar member exceed {human_size(HEADER_MAX_BYTES)}")
        data: bytes = self.inner.read(size)  # type: ignore[attr-defined]
        return data

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class _GuardedTarInfo(tarfile.TarInfo):
    """Bound what one member's headers may read, and remember how the member
    list ended, which tarfile's stream mode does not tell."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        outer = not isinstance(tarfile_.fileobj, _HeaderBudget)  # pax headers recurse
        if outer:
            tarfile_.fileobj = _HeaderBudget(tarfile_.fileobj)  # type: ignore[assignment]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            # the class and message only: the exception's traceback holds this
            # TarFile, and the cycle would keep the decoder's buffers alive
            # until the next garbage collection (RSS grew with files verified)
            tarfile_.end_reason = (type(e), str(e))  # type: ignore[attr-defined]
            raise
        finally:
            if outer:
                tarfile_.fileobj = tarfile_.fileobj.inner  # type: ignore[union-attr]


class _StreamTar(tarfile.TarFile):
    tarinfo = _GuardedTarInfo
    end_reason: tuple[type[tarfile.HeaderError], str] | None = None


@dataclass(frozen=True, slots=True)
class _Contents:
    members: int
    commit: str | None
    commit_note: str | None  # why there is no commit


def _commit_from_meta(data: bytes) -> tuple[str | None, str | None]:
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return None, "meta.json is not valid JSON"
    code_version = meta.get("code_version") if isinstance(meta, dict) else None
    commit = code_version.get("commit") if isinstance(code_version, dict) else None
    if not isinstance(commit, str):
        return None, "meta.json has no code_version.commit string"
    if not _COMMIT.fullmatch(commit):
        return None, "code_version.commit is not 40 hex characters"
    return commit.lower(), None


def meta_rank(name: str, episode_id: str) -> int | None:
    """Which meta.json speaks for the episode: lower wins. Only a member
    named exactly meta.json counts; <episode_id>/meta.json first, then the
    shallowest (sensor_meta.json, calib/meta.json... are not the episode's)."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or parts[-1] != "meta.json":
        return None
    return 0 if parts == [episode_id, "meta.json"] else len(parts)


def _walk(tar: _StreamTar, stream: zstandard.ZstdDecompressionReader, episode_id: str) -> _Contents:
    members = 0
    best: tuple[int, tuple[str | None, str | None]] | None = None
    for member in iter(tar.next, None):
        tar.members.clear()  # stream mode keeps every TarInfo otherwise
        members += 1
        rank = meta_rank(member.name, episode_id)
        if rank is None or not member.isfile() or (best is not None and rank >= best[0]):
            continue
        if member.size > META_MAX_BYTES:
            best = rank, (None, f"meta.json is {member.size} bytes (limit {META_MAX_BYTES})")
        else:
            handle = tar.extractfile(member)
            assert handle is not None  # isfile() members always have one
            best = rank, _commit_from_meta(handle.read(META_MAX_BYTES))
    kind, message = tar.end_reason or (None, "no header")
    if kind is not tarfile.EOFHeaderError:
        raise tarfile.TarError(f"archive ends without an end-of-archive block ({message})")
    while stream.read(READ_SIZE):  # decode to the end of the last frame: checksums
        pass
    commit, note = (None, "no meta.json member") if best is None else best[1]
    return _Contents(members, commit, note)


def _read_tar(source: HashingReader, decoder: zstandard.ZstdDecompressor, episode_id: str) -> _Contents:
    stream = decoder.stream_reader(source, read_size=READ_SIZE, read_across_frames=True, closefd=False)
    with stream, _StreamTar.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar:
        return _walk(tar, stream, episode_id)


# --- one tarball --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intact:
    sha256: str
    size: int
    commit: str | None
    commit_note: str | None  # why the row has no commit
    members: int
    checksummed: bool  # every zstd frame carried a content checksum


def _never_wait() -> None:
    pass


def read_tarball(
    fd: int,
    size: int,
    episode_id: str = "",
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> Intact:
    """Read the first `size` bytes of an open file and verify them. Raises
    Corrupt or Unverifiable, or OSError when the file cannot be read.
    on_wait is called while a large window waits for the budget."""
    decoding = decoding or Decoding()
    first = zstdframe.first_header(lambda n, at: syscalls.pread_exact(fd, n, at), size)
    window = 0 if first is None else first.window
    while True:  # twice at most: a later frame may need a larger window than the first
        walker = zstdframe.FrameWalker(lambda frame: decoding.refuse(frame, first and first.dict_id))
        source = HashingReader(fd, size, walker.feed, on_read)
        problem = unverifiable = None
        contents = None
        allowed = window
        refused = first is not None and decoding.refuse(first)
        if not refused:
            with decoding.reserved(window, on_wait) as allowed:
                try:
                    contents = _read_tar(
                        source, decoding.decoder(first.dict_id if first else 0, allowed), episode_id
                    )
                except zstandard.ZstdError as e:
                    problem = f"zstd: {e}"
                except _OverBound as e:
                    unverifiable = str(e)
                except OSError:
                    raise
                except Exception as e:  # tarfile on hostile input raises more than TarError
                    problem = f"tar: {e}"
        source.drain()  # the whole file: sha256, and the frame walker's verdict
        broken = walker.problem(source.size)
        if broken:
            raise Corrupt(broken)
        if walker.refusal or unverifiable:
            raise Unverifiable(walker.refusal or unverifiable or "")
        if problem and allowed < walker.max_window:  # a later frame's window: read again with it
            window = walker.max_window
            continue
        if problem:
            raise Corrupt(problem)
        assert contents is not None
        return Intact(
            sha256=source.sha256.hexdigest(),
            size=source.size,
            commit=contents.commit,
            commit_note=contents.commit_note,
            members=contents.members,
            checksummed=walker.unchecksummed_frames == 0,
        )


@dataclass(frozen=True, slots=True)
class Unsettled:
    """Changed, replaced or removed while we looked: try again next pass."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    reason: str


Verdict = Intact | Corrupt | Unverifiable | Unsettled | Unreadable


def verify(
    host: HostDir,
    tarball: Tarball,
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> Verdict:
    """Verify `tarball` as scanned. A file whose size, mtime or identity moved
    while it was read is Unsettled, even if its bytes looked corrupt: a file
    still being written looks truncated."""
    try:
        fd = host.open(tarball)
    except FileNotFoundError:
        return Unsettled("removed before it was read")
    except NotRegularFile as e:
        return Unsettled(e.strerror or "replaced")
    except OSError as e:
        return Unreadable(f"open: {e.strerror}")
    try:
        verdict: Verdict = read_tarball(fd, tarball.size, tarball.episode_id, decoding, on_read, on_wait)
    except (Corrupt, Unverifiable) as e:
        verdict = e
    except OSError as e:
        verdict = Unreadable(f"read: {e.strerror}")
    try:
        moved = host.moved(tarball, fd)
    finally:
        os.close(fd)
    if moved is None and isinstance(verdict, Intact) and verdict.size != tarball.size:
        moved = "changed while it was read"  # shorter than scanned, then back to the same size and time
    return verdict if moved is None else Unsettled(moved)


def verify_one(
    store: Store,
    tarball: Tarball,
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> Verdict:
    """Verify one tarball through its host directory fd (opened afresh: the
    host directory may have been replaced since the listing)."""
    host = store.open_host(tarball.host_id)
    if not isinstance(host, HostDir):
        return Unsettled("host directory removed or replaced")
    with host:
        return verify(host, tarball, decoding, on_read, on_wait)
