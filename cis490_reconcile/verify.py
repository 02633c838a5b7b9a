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

import errno
import itertools
import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, NamedTuple, cast

import zstandard

from . import syscalls, zstdframe
from .reading import READ_SIZE, HashingReader, read_head
from .store import HostDir, NotRegularFile, Store, Tarball
from .tarstream import Damaged, OverBound, TarStream
from .verdicts import Corrupt, Decoding, Intact, Unreadable, Unsettled, Unverifiable, Verdict

META_MAX_BYTES = 1 << 20
PROGRESS_BYTES = 8 << 20  # decoded bytes between two signs of life (_Decoded)
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")


# --- tar ----------------------------------------------------------------------


class _Contents(NamedTuple):
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


class _Decoded:
    """The decoded stream, saying on_read(0) every PROGRESS_BYTES: a small
    file may decode to gigabytes (zeros, millions of empty tar headers)
    with no read of the file between, and the watchdog and a stop request
    must still hear from the verifier (on_read is where both are heard)."""

    def __init__(
        self, stream: zstandard.ZstdDecompressionReader, on_read: Callable[[int], None] | None
    ) -> None:
        self._stream = stream
        self._on_read = on_read
        self._since = 0

    def _decoded(self, n: int) -> int:
        self._since += n
        if self._since >= PROGRESS_BYTES and self._on_read is not None:
            self._since = 0
            self._on_read(0)
        return n

    def readinto(self, view: memoryview) -> int:
        return self._decoded(self._stream.readinto(view))


def _read_tar(
    source: HashingReader,
    decoder: zstandard.ZstdDecompressor,
    episode_id: str,
    on_read: Callable[[int], None] | None,
) -> _Contents:
    """Every member to the end-of-archive block, then the rest of the zstd
    stream (its checksums); the best meta.json's commit on the way."""
    raw = cast("IO[bytes]", source)  # zstandard calls read() only
    with decoder.stream_reader(raw, read_size=READ_SIZE, read_across_frames=True, closefd=False) as stream:
        decoded = _Decoded(stream, on_read)
        tar = TarStream(decoded.readinto)
        members = 0
        best: tuple[int, tuple[str | None, str | None]] | None = None
        for member in tar:
            members += 1
            rank = meta_rank(member.name, episode_id)
            if rank is None or not member.is_file or (best is not None and rank >= best[0]):
                continue
            if member.size > META_MAX_BYTES:
                best = rank, (None, f"meta.json is {member.size} bytes (limit {META_MAX_BYTES})")
            else:
                best = rank, _commit_from_meta(tar.read_data(META_MAX_BYTES))
        tar.drain()  # decode to the end of the last frame: checksums
    commit, note = (None, "no meta.json member") if best is None else best[1]
    return _Contents(members, commit, note)


# --- one tarball --------------------------------------------------------------


def _never_wait() -> None:
    pass


class Seen(NamedTuple):
    """What one read of a file saw, whatever the verdict (`check` shows it):
    the sha256 and size of the bytes read, and the zstd frames they held."""

    sha256: str
    size: int
    frames: int  # complete zstd frames
    max_window: int  # the largest window a frame header declared
    checksummed: bool  # every complete frame carried a content checksum


def examine(
    fd: int,
    size: int,
    episode_id: str = "",
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> tuple[Intact | Corrupt | Unverifiable, Seen]:
    """Read the first `size` bytes of an open file and verify them: the
    verdict and what the read saw. Raises OSError when the file cannot be
    read, or zstd cannot have the memory it asks for (unreadable here, not
    corrupt). on_wait is called while a large window waits for the budget."""
    decoding = decoding or Decoding()
    head = read_head(fd, size)  # a small tarball whole: read once, headers and all

    def read_at(n: int, at: int) -> bytes:  # a frame header's few bytes
        return bytes(head.data[at : at + n]) if at + n <= len(head.data) else syscalls.pread_exact(fd, n, at)

    first = zstdframe.first_header(read_at, size)
    window = 0 if first is None else first.window
    while True:  # twice at most: a later frame may need a larger window than the first
        walker = zstdframe.FrameWalker(lambda frame: decoding.refuse(frame, first.dict_id if first else None))
        source = HashingReader(fd, size, walker.feed, on_read, head)
        problem = unverifiable = None
        contents = None
        allowed = window
        refused = first is not None and decoding.refuse(first)
        if not refused:
            with decoding.reserved(window, on_wait) as allowed:
                try:
                    decoder = decoding.decoder(first.dict_id if first else 0, allowed)
                    contents = _read_tar(source, decoder, episode_id, on_read)
                except zstandard.ZstdError as e:
                    if "Allocation error" in str(e):  # not the bytes: this process (LimitAS=, overcommit)
                        raise OSError(errno.ENOMEM, f"zstd could not allocate its memory ({e})") from e
                    problem = f"zstd: {e}"
                except Damaged as e:
                    problem = f"tar: {e}"
                except OverBound as e:
                    unverifiable = str(e)
        source.drain()  # the whole file: sha256, and the frame walker's verdict
        broken, refusal = walker.problem(source.size), walker.refusal or unverifiable
        if problem and not broken and not refusal and allowed < walker.max_window:
            window = walker.max_window  # a later frame's window: read again with it
            continue
        seen = Seen(
            source.sha256.hexdigest(),
            source.size,
            walker.frames,
            walker.max_window,
            walker.unchecksummed_frames == 0,
        )
        if broken:  # structure first: frames cut short are corrupt whatever else is wrong
            return Corrupt(broken), seen
        if refusal:
            return Unverifiable(refusal), seen
        if problem:
            return Corrupt(problem), seen
        assert contents is not None
        intact = Intact(
            sha256=seen.sha256,
            size=seen.size,
            commit=contents.commit,
            commit_note=contents.commit_note,
            members=contents.members,
            checksummed=seen.checksummed,
        )
        return intact, seen


def examine_file(
    host: HostDir,
    tarball: Tarball,
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> tuple[Verdict, Seen | None]:
    """Verify `tarball` as scanned; what the read saw, when the file could be
    read. A file whose size, mtime or identity moved while it was read is
    Unsettled, even if its bytes looked corrupt: a file still being written
    looks truncated."""
    try:
        fd = host.open(tarball)
    except FileNotFoundError:
        return Unsettled("removed before it was read"), None
    except NotRegularFile as e:
        return Unsettled(e.strerror or "replaced"), None
    except OSError as e:
        return Unreadable(f"open: {e.strerror}"), None
    seen = None
    try:
        verdict: Verdict
        verdict, seen = examine(fd, tarball.size, tarball.episode_id, decoding, on_read, on_wait)
    except OSError as e:
        verdict = Unreadable(f"read: {e.strerror}")
    try:
        moved = host.moved(tarball)
    finally:
        os.close(fd)
    if moved is None and seen is not None and seen.size != tarball.size:
        moved = "changed while it was read"  # shorter than scanned, then back to the same size and time
    return (verdict, seen) if moved is None else (Unsettled(moved), seen)


def verify(
    host: HostDir,
    tarball: Tarball,
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> Verdict:
    """Verify `tarball` as scanned (examine_file's verdict)."""
    return examine_file(host, tarball, decoding, on_read, on_wait)[0]


def verify_many(
    store: Store,
    tarballs: Iterable[Tarball],
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] = _never_wait,
) -> Iterator[tuple[Tarball, Verdict]]:
    """Verify tarballs in order, through their host directory's fd, opened
    afresh for each run of one host's tarballs (it may have been replaced
    since the listing). Once a run, not once a file: on 64 KiB tarballs the
    openat and close cost a tenth of the verdict."""
    for host_id, run in itertools.groupby(tarballs, key=operator.attrgetter("host_id")):
        host = store.open_host(host_id)
        if not isinstance(host, HostDir):
            yield from ((tarball, Unsettled("host directory removed or replaced")) for tarball in run)
            continue
        with host:
            for tarball in run:
                yield tarball, verify(host, tarball, decoding, on_read, on_wait)


def verify_one(
    store: Store,
    tarball: Tarball,
    decoding: Decoding | None = None,
    on_read: Callable[[int], None] | None = None,
) -> Verdict:
    """One tarball, as verify_many verifies each."""
    [(_, verdict)] = verify_many(store, [tarball], decoding, on_read)  # to the end: the host fd is closed
    return verdict
