"""Verifying one tarball: every way a real .tar.zst can be incomplete or
damaged is Corrupt; every complete one is Intact with the right sha256."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from helpers import COMMIT, episode, gnu_tarball, meta, tar_bytes, zstd

from cis490_reconcile.store import Store
from cis490_reconcile.verify import Corrupt, Intact, Unsettled, read_tarball, verify


def check(data: bytes, tmp_path: Path) -> Intact:
    path = tmp_path / "x.tar.zst"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_tarball(fd, len(data))
    finally:
        os.close(fd)


def corrupt_reason(data: bytes, tmp_path: Path) -> str:
    with pytest.raises(Corrupt) as info:
        check(data, tmp_path)
    return info.value.reason


# --- complete tarballs ----------------------------------------------------------


@pytest.mark.parametrize("checksum", [True, False])
def test_python_tarball_is_intact(tmp_path: Path, checksum: bool) -> None:
    data = zstd(tar_bytes(episode()), checksum=checksum)
    got = check(data, tmp_path)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.size == len(data)
    assert got.commit == COMMIT
    assert got.commit_note is None
    assert got.members == 2
    assert got.checksummed is checksum


def test_gnu_tar_and_zstd_cli_tarball_is_intact(tmp_path: Path) -> None:
    data = gnu_tarball(tmp_path / "gnu.tar.zst", episode())
    got = check(data, tmp_path)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.commit == COMMIT
    assert got.checksummed  # the CLI writes a content checksum by default


def test_multi_frame_and_skippable_frames_are_intact(tmp_path: Path) -> None:
    tar = tar_bytes(episode())
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    data = skippable + zstd(tar[:1536]) + zstd(tar[1536:], checksum=False)
    got = check(data, tmp_path)
    assert got.commit == COMMIT
    assert not got.checksummed


def test_large_member_streams_through(tmp_path: Path) -> None:
    payload = os.urandom(6 << 20)  # many reads, many zstd blocks
    got = check(zstd(tar_bytes(episode(payload))), tmp_path)
    assert got.size > 6 << 20


# --- incomplete or damaged ------------------------------------------------------------


@pytest.mark.parametrize("maker", ["python", "gnu"])
def test_every_truncation_is_corrupt(tmp_path: Path, maker: str) -> None:
    """Cut a real tarball at every byte offset: none of them may pass."""
    members = episode(os.urandom(700) * 2)
    data = gnu_tarball(tmp_path / "g.tar.zst", members) if maker == "gnu" else zstd(tar_bytes(members))
    path = tmp_path / "cut.tar.zst"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(Corrupt):
                read_tarball(fd, cut)
        finally:
            os.close(fd)


def test_cut_in_half(tmp_path: Path) -> None:
    data = zstd(tar_bytes(episode(os.urandom(1 << 20))))
    assert "truncated" in corrupt_reason(data[: len(data) // 2], tmp_path)


def _blocks(pieces: list[bytes], checksum: bool = True) -> tuple[bytes, list[int]]:
    """Compress pieces, ending a zstd block after each; return the frame and
    the offsets where blocks end."""
    cobj = zstandard.ZstdCompressor(write_checksum=checksum).compressobj()
    out, ends = b"", []
    for piece in pieces:
        out += cobj.compress(piece) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        ends.append(len(out))
    return out + cobj.flush(), ends


def _member_offsets(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return [m.offset for m in t.getmembers()]


def test_cut_on_zstd_block_boundary(tmp_path: Path) -> None:
    tar = tar_bytes(episode(os.urandom(300_000)))
    data, ends = _blocks([tar[i : i + 65536] for i in range(0, len(tar), 65536)])
    assert len(ends) > 3
    for end in ends[:-1]:
        assert "truncated" in corrupt_reason(data[:end], tmp_path)


def test_cut_on_tar_member_boundary_inside_zstd(tmp_path: Path) -> None:
    """The zstd stream is cut exactly where a tar member starts."""
    members = {f"ep/m{i}.bin": os.urandom(5000) for i in range(4)} | {"ep/meta.json": meta()}
    tar = tar_bytes(members)
    offsets = _member_offsets(tar)[1:]
    pieces = [tar[a:b] for a, b in zip([0, *offsets], [*offsets, len(tar)], strict=True)]
    data, ends = _blocks(pieces)
    for end in ends[:-1]:
        assert "truncated" in corrupt_reason(data[:end], tmp_path)


def test_complete_frame_of_a_tar_cut_on_member_boundary(tmp_path: Path) -> None:
    """`tar c | zstd` where tar died: zstd ends its frame properly, but the
    archive has no end-of-archive block. tarfile alone accepts this."""
    members = {f"ep/m{i}.bin": os.urandom(5000) for i in range(4)} | {"ep/meta.json": meta()}
    tar = tar_bytes(members)
    for offset in _member_offsets(tar)[1:]:
        reason = corrupt_reason(zstd(tar[:offset]), tmp_path)
        assert "end-of-archive" in reason


def test_bit_flip_with_checksum(tmp_path: Path) -> None:
    data = bytearray(zstd(tar_bytes(episode(b"A" * 100_000 + os.urandom(100)))))
    assert len(data) > 200
    for position in range(20, len(data) - 4, max(1, len(data) // 50)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        corrupt_reason(bytes(flipped), tmp_path)


def test_checksum_mismatch_reason(tmp_path: Path) -> None:
    data = bytearray(zstd(tar_bytes(episode())))
    data[-1] ^= 0xFF  # last byte of the content checksum
    assert "checksum" in corrupt_reason(bytes(data), tmp_path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty file"),
        (b"not a tarball at all, just text\n" * 10, "not zstd"),
        (tar_bytes(episode()), "not zstd"),  # a plain tar named .tar.zst
        (zstd(b"zstd, but the content is not a tar archive\n" * 50), "tar:"),
        (zstd(b""), "tar:"),
        (zstd(tar_bytes(episode())) + b"trailing junk", "garbage after the last zstd frame"),
    ],
    ids=["zero-bytes", "text", "plain-tar", "zstd-not-tar", "zstd-empty", "trailing-garbage"],
)
def test_not_a_tar_zst(tmp_path: Path, data: bytes, expected: str) -> None:
    assert expected in corrupt_reason(data, tmp_path)


def test_oversized_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A pax header claiming 64 MiB (compressed to a few KB): tarfile would
    read it whole into memory."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 64 << 20
    block = header.tobuf(format=tarfile.USTAR_FORMAT)
    data = zstd(block + bytes(header.size) + bytes(1024))
    assert len(data) < 20_000
    assert "tar header payload" in corrupt_reason(data, tmp_path)


# --- meta.json ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "commit", "note"),
    [
        ({"ep/frames.bin": b"x"}, None, "no meta.json member"),
        ({"ep/meta.json": b"{not json"}, None, "not valid JSON"),
        ({"ep/meta.json": b"[1, 2]"}, None, "no code_version.commit"),
        ({"ep/meta.json": meta(commit="abc123")}, None, "not 40 hex"),
        ({"ep/meta.json": meta(commit="g" * 40)}, None, "not 40 hex"),
        ({"ep/meta.json": meta(commit=12345)}, None, "no code_version.commit"),
        ({"ep/meta.json": meta(commit=COMMIT.upper())}, COMMIT, None),
        ({"ep/meta.json": meta() + b" " * (2 << 20)}, None, "limit"),
        ({"a.bin": b"1", "x/episode_meta.json": meta(), "y/meta.json": b"{}"}, COMMIT, None),
    ],
    ids=["none", "invalid", "not-object", "short", "not-hex", "number", "uppercase", "huge", "first-wins"],
)
def test_commit_from_meta(
    tmp_path: Path, members: dict[str, bytes], commit: str | None, note: str | None
) -> None:
    got = check(zstd(tar_bytes(members)), tmp_path)
    assert got.commit == commit
    if note is None:
        assert got.commit_note is None
    else:
        assert note in got.commit_note


def test_many_tiny_members(tmp_path: Path) -> None:
    members = {f"ep/f{i:05d}": b"" for i in range(5000)} | {"ep/meta.json": meta()}
    got = check(zstd(tar_bytes(members, fmt=tarfile.USTAR_FORMAT)), tmp_path)
    assert got.members == 5001
    assert got.commit == COMMIT


# --- stability: a file that moves while it is read ----------------------------------


def _host(tmp_path: Path, data: bytes):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "e.tar.zst").write_bytes(data)
    store = Store(tmp_path)
    host = store.open_host("h")
    return store, host, host.lstat("e")


def test_rewritten_while_read_is_unsettled(tmp_path: Path) -> None:
    data = zstd(tar_bytes(episode(os.urandom(3 << 20))))
    store, host, tarball = _host(tmp_path, data)
    path = tmp_path / "h" / "e.tar.zst"
    calls = []

    def rewrite(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            with open(path, "r+b") as f:  # same size, new bytes, new mtime
                f.seek(len(data) // 2)
                f.write(b"\0" * 4096)

    with store, host:
        verdict = verify(host, tarball, rewrite)
    assert len(calls) > 1
    assert verdict == Unsettled("changed while it was read")


def test_growing_while_read_is_unsettled(tmp_path: Path) -> None:
    data = zstd(tar_bytes(episode(os.urandom(3 << 20))))
    store, host, tarball = _host(tmp_path, data)
    path = tmp_path / "h" / "e.tar.zst"

    def grow(n: int) -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    with store, host:
        assert isinstance(verify(host, tarball, grow), Unsettled)


def test_replaced_while_read_is_unsettled(tmp_path: Path) -> None:
    data = zstd(tar_bytes(episode(os.urandom(3 << 20))))
    store, host, tarball = _host(tmp_path, data)
    replacement = tmp_path / "h" / "new.tmp"
    replacement.write_bytes(data)

    def replace(n: int) -> None:
        if replacement.exists():
            os.rename(replacement, tmp_path / "h" / "e.tar.zst")

    with store, host:
        assert verify(host, tarball, replace) == Unsettled("replaced while it was read")


def test_removed_before_read_is_unsettled(tmp_path: Path) -> None:
    store, host, tarball = _host(tmp_path, zstd(tar_bytes(episode())))
    os.unlink(tmp_path / "h" / "e.tar.zst")
    with store, host:
        assert verify(host, tarball) == Unsettled("removed before it was read")


def test_truncated_file_still_being_written_is_unsettled_not_corrupt(tmp_path: Path) -> None:
    """A file that looks truncated because it is still growing is not corrupt."""
    data = zstd(tar_bytes(episode(os.urandom(3 << 20))))
    store, host, tarball = _host(tmp_path, data[: len(data) // 3])
    path = tmp_path / "h" / "e.tar.zst"
    rest = [data[len(data) // 3 :]]

    def finish_upload(n: int) -> None:
        if rest:
            with open(path, "ab") as f:
                f.write(rest.pop())

    with store, host:
        assert verify(host, tarball, finish_upload) == Unsettled("changed while it was read")
