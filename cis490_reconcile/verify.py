"""Verifying one tarball: read it once, prove it complete and intact.

One pass over the bytes on disk feeds three checks, with memory bounded by
small buffers whatever the size of the file or of any member:

    file --read--> sha256 (of the bytes on disk, for the row)
             \\--> _FrameWalker (zstd frame structure: is the file complete?)
             \\--> zstandard stream_reader --> tarfile "r|" --> meta.json

Why all three (FACTS.md): zstandard's streaming APIs report no error when a
file is cut short, and tarfile in stream mode reports none when the cut falls
on a member boundary. A frame cut anywhere leaves _FrameWalker short of the
frame's last block (and of its checksum, when the frame has one). The
decoder rejects corrupt blocks and checksum mismatches. tarfile rejects
headers with a bad checksum, and _GuardedTarInfo records how the archive
ended, so an archive without its end-of-archive block (a `tar | zstd` whose
tar died) is caught too. A bit flip inside member data of a frame WITHOUT a
content checksum is the one corruption nothing here can see.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from . import syscalls
from .store import HostDir, NotRegularFile, Tarball

_READ_SIZE = 1 << 20  # raw bytes per read()
_DROP_EVERY = 8 << 20  # drop read pages from the page cache this often
_TAR_BUFSIZE = 64 << 10  # decompressed bytes per tarfile read
META_MAX_BYTES = 1 << 20
HEADER_MAX_BYTES = 1 << 20  # pax / GNU long-name header payloads
# zstd levels 1-20 need at most a 32 MiB window; --ultra -21/-22 and --long
# ask for more. Refusing them keeps a hostile frame from claiming 2 GiB.
MAX_WINDOW_BYTES = 32 << 20
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")


class Corrupt(Exception):
    """The file can never become a valid episode tarball as it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- zstd frame structure (RFC 8878) ----------------------------------------

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_MAX_BLOCK = 128 << 10
_MAGIC, _DESCRIPTOR, _HEADER_REST, _BLOCK, _CHECKSUM, _SKIP_SIZE = range(6)


class _FrameWalker:
    """Follows the frame structure of the raw bytes without decoding them:
    frame headers, block headers (skipping block contents), checksums,
    skippable frames. At end of input it knows whether the file ends exactly
    at the end of a frame. A few header bytes of state, whatever the input."""

    def __init__(self) -> None:
        self._state, self._need, self._header = _MAGIC, 4, b""
        self._skip = 0  # block or skippable-frame bytes still to pass over
        self._has_checksum = False
        self.frames = 0
        self.unchecksummed_frames = 0
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end and self.error is None:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            step = min(self._need - len(self._header), end - pos)
            self._header += view[pos : pos + step]
            pos += step
            if len(self._header) == self._need:
                header, self._header = self._header, b""
                self._advance(header)

    def _expect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == _MAGIC:
            magic = int.from_bytes(header, "little")
            if magic == _ZSTD_MAGIC:
                self._expect(_DESCRIPTOR, 1)
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._expect(_SKIP_SIZE, 4)
            else:
                self.error = "garbage after the last zstd frame" if self.frames else "not zstd data"
        elif state == _DESCRIPTOR:
            desc = header[0]
            if desc & 0x08:
                self.error = "invalid zstd frame header (reserved bit set)"
                return
            single_segment = desc >> 5 & 1
            self._has_checksum = bool(desc & 0x04)
            rest = (
                (0 if single_segment else 1)  # window descriptor
                + (0, 1, 2, 4)[desc & 0x03]  # dictionary id
                + (single_segment, 2, 4, 8)[desc >> 6]  # frame content size
            )
            self._expect(_HEADER_REST, rest) if rest else self._expect(_BLOCK, 3)
        elif state == _HEADER_REST:
            self._expect(_BLOCK, 3)
        elif state == _BLOCK:
            value = int.from_bytes(header, "little")
            last, block_type, size = value & 1, value >> 1 & 3, value >> 3
            if block_type == 3 or size > _MAX_BLOCK:
                self.error = "invalid zstd block header"
                return
            self._skip = 1 if block_type == 1 else size  # an RLE block stores one byte
            if not last:
                self._expect(_BLOCK, 3)
            elif self._has_checksum:
                self._expect(_CHECKSUM, 4)
            else:
                self._end_frame()
        elif state == _CHECKSUM:
            self._end_frame()
        else:  # _SKIP_SIZE
            self._skip = int.from_bytes(header, "little")
            self._expect(_MAGIC, 4)

    def _end_frame(self) -> None:
        self.frames += 1
        self.unchecksummed_frames += not self._has_checksum
        self._expect(_MAGIC, 4)

    def problem(self, total_bytes: int) -> str | None:
        """Why the input, now ended, is not a sequence of complete frames."""
        if self.error:
            return self.error
        if self._state != _MAGIC or self._header or self._skip:
            return "truncated: ends inside a zstd frame"
        if total_bytes == 0:
            return "empty file"
        return None if self.frames else "no zstd frame"


# --- the single read ----------------------------------------------------------


class _Source:
    """The file as the decoder sees it: each byte read once, hashed and walked.
    Reads stop at `limit` (the size the scan saw), so a file that keeps growing
    cannot keep a pass busy; the caller's stat comparison catches the growth.
    What was read is dropped from the page cache as we go: we will not read
    it again, and the receiver's working set should stay cached."""

    def __init__(self, fd: int, limit: int, on_read: Callable[[int], None] | None) -> None:
        self._fd = fd
        self._limit = limit
        self._on_read = on_read
        self.sha256 = hashlib.sha256()
        self.frames = _FrameWalker()
        self.size = 0
        self._dropped = 0

    def read(self, size: int = -1) -> bytes:
        size = min(size if 0 < size <= _READ_SIZE else _READ_SIZE, self._limit - self.size)
        if size <= 0:
            return b""
        data = os.read(self._fd, size)
        if data:
            self.sha256.update(data)
            self.frames.feed(data)
            self.size += len(data)
            if self.size - self._dropped >= _DROP_EVERY or self.size == self._limit:
                syscalls.drop_cache(self._fd, self._dropped, self.size - self._dropped)
                self._dropped = self.size
            if self._on_read is not None:
                self._on_read(len(data))
        return data

    def drain(self) -> None:
        while self.read(_READ_SIZE):
            pass


# --- tar ----------------------------------------------------------------------

_BIG_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _HostileTar(Exception):
    pass


class _GuardedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's payload, and the chain of
    GNU sparse extension blocks, wholly into memory: cap both. And remember
    how the member list ended, which tarfile's stream mode does not tell."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _BIG_HEADER_TYPES and info.size > HEADER_MAX_BYTES:
            raise _HostileTar(f"tar header payload of {info.size} bytes (limit {HEADER_MAX_BYTES})")
        if info.type == tarfile.GNUTYPE_SPARSE and buf[482]:
            raise _HostileTar("GNU sparse member with extension headers (unsupported)")
        return info

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            # the class and message only: the exception's traceback holds this
            # TarFile, and the cycle would keep the decoder's buffers alive
            # until the next garbage collection (RSS grew with files verified)
            tarfile_.end_reason = (type(e), str(e))  # type: ignore[attr-defined]
            raise


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


def _read_tar(source: _Source) -> _Contents:
    decoder = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    stream = decoder.stream_reader(source, read_size=_READ_SIZE, read_across_frames=True, closefd=False)
    with stream, _StreamTar.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar:
        return _walk(tar, stream)


def _walk(tar: _StreamTar, stream: zstandard.ZstdDecompressionReader) -> _Contents:
    members = 0
    meta: tuple[str | None, str | None] | None = None
    for member in iter(tar.next, None):
        tar.members.clear()  # stream mode keeps every TarInfo otherwise
        members += 1
        if meta is None and member.isfile() and member.name.endswith("meta.json"):
            if member.size > META_MAX_BYTES:
                meta = None, f"meta.json is {member.size} bytes (limit {META_MAX_BYTES})"
            else:
                handle = tar.extractfile(member)
                assert handle is not None  # isfile() members always have one
                meta = _commit_from_meta(handle.read(META_MAX_BYTES))
    kind, message = tar.end_reason or (None, "no header")
    if kind is not tarfile.EOFHeaderError:
        raise _HostileTar(f"tar archive ends without an end-of-archive block ({message})")
    while stream.read(_READ_SIZE):  # decode to the end of the last frame: checksums
        pass
    if meta is None:
        meta = None, "no meta.json member"
    return _Contents(members, *meta)


# --- one tarball --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intact:
    sha256: str
    size: int
    commit: str | None
    commit_note: str | None  # why the row has no commit
    members: int
    checksummed: bool  # every zstd frame carried a content checksum


def read_tarball(fd: int, size: int, on_read: Callable[[int], None] | None = None) -> Intact:
    """Read the first `size` bytes of an open file once and verify them.
    Raises Corrupt, or OSError when the file cannot be read."""
    source = _Source(fd, size, on_read)
    problem = None
    try:
        contents = _read_tar(source)
    except zstandard.ZstdError as e:
        problem = f"zstd: {e}"
    except OSError:
        raise
    except Exception as e:  # tarfile on hostile input raises more than TarError
        problem = f"tar: {e}"
    source.drain()  # the whole file: sha256, and the frame walker's verdict
    problem = source.frames.problem(source.size) or problem
    if problem:
        raise Corrupt(problem)
    return Intact(
        sha256=source.sha256.hexdigest(),
        size=source.size,
        commit=contents.commit,
        commit_note=contents.commit_note,
        members=contents.members,
        checksummed=source.frames.unchecksummed_frames == 0,
    )


@dataclass(frozen=True, slots=True)
class Unsettled:
    """Changed, replaced or removed while we looked: try again next pass."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    reason: str


Verdict = Intact | Corrupt | Unsettled | Unreadable


def verify(host: HostDir, tarball: Tarball, on_read: Callable[[int], None] | None = None) -> Verdict:
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
        verdict: Verdict = read_tarball(fd, tarball.size, on_read)
    except Corrupt as e:
        verdict = e
    except OSError as e:
        verdict = Unreadable(f"read: {e.strerror}")
    try:
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (tarball.size, tarball.mtime_ns):
        return Unsettled("changed while it was read")
    if isinstance(verdict, Intact) and verdict.size != tarball.size:
        return Unsettled("changed while it was read")
    now = host.lstat(tarball.episode_id)
    if not isinstance(now, Tarball) or (now.dev, now.ino) != (tarball.dev, tarball.ino):
        return Unsettled("replaced while it was read")
    return verdict
