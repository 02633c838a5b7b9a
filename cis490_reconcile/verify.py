"""Verifying one tarball: read it once, prove it complete and intact.

One pass over the bytes on disk feeds three checks, with memory bounded by
small buffers (and the zstd window a frame declares) whatever the size of
the file or of any member:

    file --read--> sha256 (of the bytes on disk, for the row)
             \\--> FrameWalker (zstd frame structure: is the file complete?)
             \\--> zstandard stream_reader --> tar headers --> meta.json

Why all three: zstandard's streaming reader reports no error when a file is
cut short, and a tar reader reports none when the cut falls on a member
boundary. A frame cut anywhere leaves FrameWalker short of the frame's last
block (and of its checksum, when the frame has one). The decoder rejects
corrupt blocks and checksum mismatches. The tar reader rejects headers with a
bad checksum and an archive without its end-of-archive block (a `tar | zstd`
whose tar died). A bit flip inside member data of a frame WITHOUT a content
checksum is the one corruption nothing here can see. verdicts.py says what
each verdict means and how memory is budgeted.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from . import syscalls, zstdframe
from .reading import READ_SIZE, HashingReader
from .runtime import human_size
from .store import HostDir, NotRegularFile, Store, Tarball
from .verdicts import Corrupt, Decoding, Intact, Unreadable, Unsettled, Unverifiable, Verdict

_TAR_BUFSIZE = 64 << 10  # decompressed bytes per tarfile read
META_MAX_BYTES = 1 << 20
HEADER_MAX_BYTES = 1 << 20  # all header bytes of one tar member: pax, long names, sparse maps
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")


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
        walker = zstdframe.FrameWalker(lambda frame: decoding.refuse(frame, first.dict_id if first else None))
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
