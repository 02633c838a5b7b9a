"""tarfile in stream mode against TarStream, walking tar archives the way verify does.

    .venv/bin/python tests/bench/tarstream_bench.py [--small N] [--large-mib M] [--runs R]

(a) N (2,000) archives of 64 KiB payload with two members (meta.json, then 64 KiB of random frames);
(b) one archive of M (256) MiB: meta.json, then four 64 MiB members, two random and two compressible.

Each walker lists every member, reads meta.json and requires the end-of-archive block, from two sources:
the tar in memory (io.BytesIO), and a zstandard stream_reader over the .tar.zst in memory, drained to its end
as verify drains it. For the zstd source the decode alone (a readinto loop) is the floor, and each walker's
time above the floor is its own cost. Best of R runs; ratios are tarfile / TarStream. Asserts nothing; not
collected by pytest.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

import zstandard

from cis490_reconcile.tarstream import TarStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from helpers import TarfileEnding

META = b'{"code_version": {"commit": "0123456789abcdef0123456789abcdef01234567"}}'
READ_SIZE = 1 << 20
Source: TypeAlias = "io.BytesIO | zstandard.ZstdDecompressionReader"


def with_tarfile(source: Source) -> int:
    with tarfile.open(fileobj=source, mode="r|", bufsize=64 << 10, tarinfo=TarfileEnding) as tar:
        members = 0
        for member in iter(tar.next, None):
            members += 1
            if member.name.endswith("meta.json") and member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None and handle.read(1 << 20) == META
        assert getattr(tar, "ending", None) is tarfile.EOFHeaderError  # type: ignore[attr-defined]
    return members


def with_tarstream(source: Source) -> int:
    stream = TarStream(source.readinto)
    members = 0
    for member in stream:
        members += 1
        if member.name.endswith("meta.json") and member.is_file:
            assert stream.read_data(1 << 20) == META
    return members


_DRAIN = memoryview(bytearray(READ_SIZE))


def decode_only(source: Source) -> int:
    while source.readinto(_DRAIN):
        pass
    return 0


def tar_of(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def timed(
    walk: Callable[[Source], int], datas: list[bytes], open_: Callable[[bytes], Source], runs: int
) -> float:
    """Best seconds of `runs` walks over every archive (sources opened before the clock starts)."""
    best = float("inf")
    for _ in range(runs):
        sources = [open_(data) for data in datas]
        started = time.perf_counter()
        for source in sources:
            walk(source)
            if isinstance(source, zstandard.ZstdDecompressionReader):
                decode_only(source)  # verify decodes to the end of the last frame: checksums
        best = min(best, time.perf_counter() - started)
    return best


def report(title: str, tars: list[bytes], runs: int, unit: float, unit_name: str) -> None:
    dctx = zstandard.ZstdDecompressor()
    packed = [zstandard.ZstdCompressor(level=3, write_checksum=True).compress(t) for t in tars]

    def zstd(data: bytes) -> Source:
        return dctx.stream_reader(io.BytesIO(data), read_size=READ_SIZE, read_across_frames=True)

    mib = 1 << 20
    print(
        f"{title} ({sum(map(len, tars)) / mib:.0f} MiB of tar, {sum(map(len, packed)) / mib:.0f} MiB of zstd)"
    )
    print(f"  {'source':<8}{'tarfile':>14}{'TarStream':>14}{'ratio':>8}{'decode alone':>16}   above decode")
    a, b = timed(with_tarfile, tars, io.BytesIO, runs), timed(with_tarstream, tars, io.BytesIO, runs)
    print(f"  {'memory':<8}{a / unit:>11.1f} {unit_name}{b / unit:>11.1f} {unit_name}{a / b:>7.1f}x")
    floor = timed(decode_only, packed, zstd, runs)
    a, b = timed(with_tarfile, packed, zstd, runs), timed(with_tarstream, packed, zstd, runs)
    above = f"tarfile {(a - floor) / unit:.1f}, TarStream {(b - floor) / unit:.1f} {unit_name}"
    print(
        f"  {'zstd':<8}{a / unit:>11.1f} {unit_name}{b / unit:>11.1f} {unit_name}{a / b:>7.1f}x"
        f"{floor / unit:>13.1f} {unit_name}   {above}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="number of 64 KiB archives")
    parser.add_argument("--large-mib", type=int, default=256, help="size of the large archive")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    small = [tar_of({"ep/meta.json": META, "ep/frames.bin": os.urandom(64 << 10)}) for _ in range(args.small)]
    report(
        f"(a) {args.small} archives of 64 KiB, 2 members; per archive",
        small,
        args.runs,
        len(small) * 1e-6,
        "us",
    )

    quarter = (args.large_mib << 20) // 4
    repeating = os.urandom(1 << 16) * (quarter >> 16)  # zstd finds the repeats: compressible
    large = {"ep/meta.json": META, "ep/a.bin": os.urandom(quarter), "ep/b.bin": repeating}
    large |= {"ep/c.bin": os.urandom(quarter), "ep/d.bin": repeating[::-1]}
    report(f"(b) one archive of {args.large_mib} MiB, 5 members", [tar_of(large)], args.runs, 1e-3, "ms")


if __name__ == "__main__":
    main()
