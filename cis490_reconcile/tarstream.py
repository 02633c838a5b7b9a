"""Walking a tar stream: each member's name, kind and size, and the first bytes of the members asked for.

verify.py must prove the tar inside each .tar.zst complete: every header intact, every member's data
present, the end-of-archive block reached. tarfile can tell, but its per-archive machinery (TarFile, _Stream
and TarInfo objects, 512-byte reads through layers of Python, member data copied in small pieces while it is
skipped) costs ~0.3 ms per small tarball and ~25% extra CPU on large ones, next to sha256 and zstd in C.
TarStream reads the decompressed stream into one buffer in big chunks, parses headers out of it, and skips
member data by moving an offset: a small archive costs tens of microseconds, a large one a loop per MiB.

Formats, read as GNU tar writes them and as tarfile reads them:

- ustar headers (name and prefix) and old GNU headers; numbers in octal or GNU base-256; the header
  checksum summed over unsigned or signed bytes.
- pax extended headers ('x', and Solaris 'X'): path, size and the GNU sparse keys. Global headers ('g') are
  parsed for their structure and otherwise ignored (tarfile applies their path and size to every later
  member, which no writer means).
- GNU long names ('L') and long link names ('K', of no interest here).
- sparse files: old GNU ('S', with extension blocks) and pax 0.0, 0.1 and 1.0 (whose map sits at the start
  of the member's data). read_data fills holes with zeros, as tarfile does.

Strictness: what tarfile rejects is Damaged here too, and a little more: a numeric field may hold only
spaces and octal digits before its NUL, a pax record must be framed exactly, pax numbers are plain decimal
(up to 18 digits), sizes and sparse entries may not be negative, a sparse map must account for exactly the
data stored (GNU tar's always do). Where tarfile misreads what GNU tar writes (a sparse file's name, a pax
size beside a sparse size), this reads as GNU tar does. The archive ends at the first all-zero block, as
for tarfile (what follows, GNU tar's second zero block and record padding, is not looked at); a stream
that ends anywhere else is Damaged.

Bounds: every header byte of one member (header blocks, pax and long-name payloads, sparse extension blocks
and the pax 1.0 map) counts against HEADER_MAX_BYTES; the read that would pass it raises OverBound before it
reads anything. Memory: one buffer (64 KiB, 1 MiB once a member's data is skipped in bulk, more only for
headers up to the bound or a read_data limit) and one sparse map of at most the bound's worth of numbers.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections.abc import Callable, Iterator
from typing import NamedTuple

HEADER_MAX_BYTES = 1 << 20
_BLOCK = 512
_SLACK = 4 * _BLOCK  # the header blocks around the payloads the bound is about
_FIRST_BUFFER = 64 << 10  # a small archive in a read or two; 128 KiB would be an mmap, page faults and all
_CHUNK = 1 << 20  # reads of bytes no one looks at: _bulk
_ZEROS = bytes(_BLOCK)
_OCTAL = re.compile(rb" *([0-7]*) *(?:\0.*)?", re.DOTALL)
_CHECKED = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode ... devminor
_OCTAL_TO_0 = bytes.maketrans(b"1234567", b"0000000")
_USUAL = b"0000000\0" * 3 + b"00000000000\0" * 2 + b"000000\0 "  # mode uid gid size mtime checksum
_USUAL_DEV = (b"0000000\0" * 2, bytes(16))
_HIGH_BYTES = bytes(range(128, 256))
_EXTENDED = frozenset(b"xXgLK")  # headers about the next header's member ('K': its link, of no interest)
_REGULAR = frozenset(b"07\0S")
_NO_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: no data follows, whatever their size
_SPARSE_00 = (b"GNU.sparse.offset", b"GNU.sparse.numbytes")  # pax sparse 0.0: one record each per extent
_PAX = frozenset(b"xXg")
_L, _G, _S, _DIR, _NL = b"LgS5\n"


class Damaged(Exception):
    """The stream is not a complete, well-formed tar archive; the message says why."""


class OverBound(Exception):
    """One member's headers exceed HEADER_MAX_BYTES: the archive may be fine, but is not checked here."""


class Member(NamedTuple):
    name: str  # after pax path / GNU long name; utf-8 with surrogateescape, like tarfile
    is_file: bool  # regular, contiguous or sparse file
    size: int  # as a file: a sparse file's full size, holes included


class TarStream:
    """The members of the tar archive that `readinto` delivers. readinto fills a memoryview and returns the
    byte count, 0 at the end of the stream (ZstdDecompressionReader.readinto, io.BytesIO.readinto).

    Iterating yields each Member once its headers are read, and stops normally only after the end-of-archive
    block: any other ending raises Damaged. read_data peeks at the data of the member just yielded. The
    stream may be read past the end-of-archive block, as far as the buffer goes; drain reads the rest.
    """

    def __init__(self, readinto: Callable[[memoryview], int]) -> None:
        self._readinto = readinto
        self._view = memoryview(bytearray(_FIRST_BUFFER))
        self._pos = self._end = 0  # the unparsed bytes of the buffer
        self._budget = 0  # header bytes the member being parsed may still read
        self._stored = 0  # bytes of data stored for the member last yielded, after a pax 1.0 map
        self._size = 0  # its size as a file
        self._sparse: array[int] | None = None  # its sparse map: offset, length, offset, length...

    def __iter__(self) -> Iterator[Member]:
        while (member := self._next()) is not None:
            yield member
            self._skip(-(-self._stored // _BLOCK) * _BLOCK)  # the data and its padding

    def read_data(self, limit: int) -> bytes:
        """Up to `limit` (>= 0) bytes from the start of the member last yielded (a sparse file's holes read
        as zeros). Valid from yielding the member to asking for the next; the data is not consumed."""
        n = min(limit, self._stored)
        if not self._fill(n):
            raise Damaged("the archive ends inside a member's data")
        data = bytes(self._view[self._pos : self._pos + n])
        return data if self._sparse is None else _expand(data, self._sparse, min(limit, self._size))

    def drain(self) -> None:
        """Read the stream to its end (after the end-of-archive block: the rest of the zstd stream and its
        checksums), into the buffer, looking at nothing."""
        while got := self._readinto(self._view):
            if got == len(self._view):  # more than a trailer: read the rest in big pieces
                self._bulk()
        self._pos = self._end = 0

    # --- the buffer -------------------------------------------------------------------------------------

    def _bulk(self) -> None:
        """Reads of bytes no one looks at (skipped data, the stream's tail) use a _CHUNK buffer, so that a
        large stretch takes few calls. Its bytes are dropped: call it only with none left to parse."""
        if len(self._view) < _CHUNK:
            self._view = memoryview(bytearray(_CHUNK))

    def _fill(self, n: int) -> bool:
        """Make n bytes available from _pos in one piece, reading as much as the buffer holds; False if the
        stream ends first."""
        have = self._end - self._pos
        if have >= n:
            return True
        view = memoryview(bytearray(n)) if n > len(self._view) else self._view
        view[:have] = self._view[self._pos : self._end]
        self._view, self._pos, self._end = view, 0, have
        while self._end < n:
            got = self._readinto(view[self._end :])
            if not got:
                return False
            self._end += got
        return True

    def _skip(self, n: int) -> None:
        """Pass over n bytes: move the offset, or read whole buffers without looking at them."""
        have = self._end - self._pos
        if n <= have:
            self._pos += n
            return
        n -= have
        if n > len(self._view):
            self._bulk()
        while True:
            got = self._readinto(self._view)
            if not got:
                raise Damaged("the archive ends inside a member's data")
            if got >= n:
                self._pos, self._end = n, got
                return
            n -= got

    def _spend(self, n: int) -> None:
        """Count n header bytes against the member's bound, before reading them."""
        self._budget -= n
        if self._budget < 0:
            raise OverBound(f"the headers of a tar member exceed {HEADER_MAX_BYTES / (1 << 20):.1f} MiB")

    def _take(self, n: int, what: str) -> bytes:
        """The next n bytes of a member's headers."""
        self._spend(n)
        if not self._fill(n):
            raise Damaged(f"the archive ends inside {what}")
        self._pos += n
        return bytes(self._view[self._pos - n : self._pos])

    # --- headers ----------------------------------------------------------------------------------------

    def _next(self) -> Member | None:
        """Read one member's headers, leaving _pos at its data; None at the end-of-archive block."""
        self._budget = HEADER_MAX_BYTES + _SLACK
        if not self._fill(_BLOCK) and self._pos == self._end:
            raise Damaged("the archive ends without an end-of-archive block")
        block = self._take(_BLOCK, "a header")
        if block == _ZEROS:
            return None
        pax: dict[bytes, bytes] = {}
        name = None  # the first extended header naming the member wins, as for tarfile
        while True:
            kind, size = block[156], _check(block)
            if size < 0:
                raise Damaged("a tar header gives a negative size")
            if kind not in _EXTENDED:
                return self._member(block, kind, size, pax, name)
            payload = self._take(-(-size // _BLOCK) * _BLOCK, "an extended header")
            if kind == _L and name is None:  # up to a NUL, even past the size, as for tarfile
                name = _text(payload.split(b"\0", 1)[0])
            elif kind in _PAX:
                records = _records(payload[:size])
                if kind != _G:
                    pax = records | pax  # here too, the first header wins
                    name = _pax_name(records) if name is None else name
            block = self._take(_BLOCK, "a member's headers")
            if block == _ZEROS:
                raise Damaged("an end-of-archive block follows an extended header")

    def _member(
        self, block: bytes, kind: int, size: int, pax: dict[bytes, bytes], name: str | None
    ) -> Member:
        """The member of this header, after the pax records and long name that came before it."""
        raw_name = block[:100].split(b"\0", 1)[0]
        if kind == 0 and raw_name.endswith(b"/"):
            kind = _DIR  # how old tars mark a directory
        if name is None:
            name = _text(raw_name)
            prefix = block[345:500].split(b"\0", 1)[0]  # as tarfile: whatever the magic says
            if prefix and kind != _S:
                name = f"{_text(prefix)}/{name}"
        if kind == _DIR:
            name = name.rstrip("/")
        size = _decimal(pax[b"size"]) if b"size" in pax else size
        stored = 0 if kind in _NO_DATA else size
        self._sparse = None
        if kind == _S:  # old GNU sparse: 4 map entries in the header, 21 in each extension block
            self._sparse = sparse = _gnu_sparse(block, 386, 4, array("q"))
            extended, size = block[482], _number(block, 483, 495)
            while extended:
                ext = self._take(_BLOCK, "a sparse header")
                _gnu_sparse(ext, 0, 21, sparse)
                extended = ext[504]
        if b"GNU.sparse.map" in pax:  # pax sparse 0.1
            self._sparse = array("q", _numbers(pax[b"GNU.sparse.map"]))
        elif b"GNU.sparse.size" in pax:  # 0.0
            offsets, lengths = (_numbers(pax[key]) if key in pax else [] for key in _SPARSE_00)
            self._sparse = array("q", [n for pair in zip(offsets, lengths, strict=False) for n in pair])
        elif pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            stored -= self._sparse_map()  # the map is part of the data: what remains must match it
        real = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))  # as GNU tar: over `size`
        self._stored, self._size = stored, size if real is None else _decimal(real)
        if self._size < 0:
            raise Damaged("a sparse header gives a negative size")
        if self._sparse is None and kind not in _NO_DATA and self._size != stored:
            raise Damaged("a pax header gives a member a size its stored data disagrees with")
        if self._sparse is not None and sum(self._sparse[1::2]) != stored:
            raise Damaged("a sparse map does not match its member's stored data")
        return Member(name, kind in _REGULAR, self._size)

    def _sparse_map(self) -> int:
        """Read the pax 1.0 sparse map at the start of the member's data: decimal numbers, each ended by a
        newline (a count, then that many offset and length pairs), padded to a block. Counted against the
        header bound block by block, so a map claiming a billion entries stops at the bound. Its size."""
        self._spend(_BLOCK)
        if not self._fill(_BLOCK):
            raise Damaged("the archive ends inside a sparse map")
        first = bytes(self._view[self._pos : self._pos + _BLOCK])
        if _NL not in first:
            raise Damaged("a sparse map does not start with its count")
        wanted = 2 * _decimal(first.partition(b"\n")[0]) + 1  # newlines
        lines, size = first.count(b"\n"), _BLOCK
        while lines < wanted:
            self._spend(_BLOCK)
            size += _BLOCK
            if not self._fill(size):
                raise Damaged("the archive ends inside a sparse map")
            lines += bytes(self._view[self._pos + size - _BLOCK : self._pos + size]).count(b"\n")
        numbers = bytes(self._view[self._pos : self._pos + size]).split(b"\n", wanted)[1:wanted]
        self._sparse = array("q", map(_decimal, numbers))
        self._pos += size
        return size


def _check(block: bytes) -> int:
    """Reject a header whose checksum or numeric fields tarfile would reject; return its size field."""
    # GNU tar and tarfile write zero-padded octal ended by a NUL (the checksum: NUL, space). Fields of
    # exactly that shape are valid as they stand; others (spaces, base-256, garbage) go field by field.
    if (
        block[100:156].translate(_OCTAL_TO_0) == _USUAL
        and block[329:345].translate(_OCTAL_TO_0) in _USUAL_DEV
    ):
        size, stored = int(block[124:135], 8), int(block[148:154], 8)
    else:
        for start, end in _CHECKED:
            _number(block, start, end)
        size, stored = _number(block, 124, 136), _number(block, 148, 156)
    # zlib.adler32 started at 0 sums bytes modulo 65521: exact for up to 256 bytes, and 20x faster than sum()
    adler = zlib.adler32
    unsigned = 256 + (adler(block[:148], 0) & 0xFFFF) + (adler(block[156:412], 0) & 0xFFFF)
    unsigned += adler(block[412:], 0) & 0xFFFF
    if stored != unsigned:  # some old tars summed signed chars: each byte over 127 counts 256 less
        high = 504 - len((block[:148] + block[156:]).translate(None, _HIGH_BYTES))
        if stored != unsigned - 256 * high:
            raise Damaged("a tar header has a bad checksum")
    return size


def _number(block: bytes, start: int, end: int) -> int:
    """A numeric header field: octal digits between spaces, ended by a NUL or the field's end (empty is 0,
    as for tarfile), or GNU base-256 (a first byte of 0x80, or 0xff for a negative number)."""
    lead = block[start]
    if lead == 0x80 or lead == 0xFF:
        value = int.from_bytes(block[start + 1 : end], "big")
        return value - (1 << 8 * (end - start - 1)) if lead == 0xFF else value
    match = _OCTAL.fullmatch(block, start, end)
    if match is None:
        raise Damaged(f"a tar header holds {block[start:end]!r} where a number belongs")
    return int(match[1] or b"0", 8)


def _decimal(text: bytes) -> int:
    """A number of a pax record or sparse map: plain decimal digits, few enough to fit 63 bits."""
    if not (text.isdigit() and len(text) <= 18):
        raise Damaged(f"a tar header holds {text[:40]!r} where a decimal number belongs")
    return int(text)


def _numbers(text: bytes) -> list[int]:
    return [_decimal(n) for n in text.split(b",")]


def _pax_name(records: dict[bytes, bytes]) -> str | None:
    """The name a pax header gives. GNU.sparse.name first: GNU tar extracts a sparse file under it, even
    when a later path record names the placeholder (tarfile takes whichever record comes last)."""
    if b"GNU.sparse.name" in records:
        return _text(records[b"GNU.sparse.name"])
    return _text(records[b"path"]).rstrip("/") if b"path" in records else None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _records(payload: bytes) -> dict[bytes, bytes]:
    """The records of a pax header: b"<length> <keyword>=<value>\\n", the length counting the whole record,
    up to the payload's end or a NUL. The sparse 0.0 records, one pair per extent, are joined by commas."""
    records: dict[bytes, bytes] = {}
    sparse: dict[bytes, list[bytes]] = {}  # joined once at the end: adding each to the last is quadratic
    pos = 0
    while pos < len(payload) and payload[pos]:
        space = payload.find(b" ", pos, pos + 20)
        if space <= pos:
            raise Damaged("a pax record does not start with its length")
        end = pos + _decimal(payload[pos:space])
        key, equals, value = payload[space + 1 : end - 1].partition(b"=")
        if end > len(payload) or not key or not equals or payload[end - 1] != _NL:
            raise Damaged("a pax record is malformed")
        if key in _SPARSE_00:
            sparse.setdefault(key, []).append(value)
        else:
            records[key] = value
        pos = end
    return records | {key: b",".join(values) for key, values in sparse.items()}


def _gnu_sparse(block: bytes, start: int, entries: int, into: array[int]) -> array[int]:
    """Append the offset and numbytes of each entry of an old GNU sparse map (12 bytes each)."""
    for at in range(start, start + 24 * entries, 12):
        value = _number(block, at, at + 12)
        if not 0 <= value < 1 << 63:
            raise Damaged("a sparse map entry is out of range")
        into.append(value)
    return into


def _expand(packed: bytes, sparse: array[int], size: int) -> bytes:
    """The first `size` bytes of a sparse file: the stored extents at their offsets, zeros between."""
    out = bytearray(size)
    at = 0  # in packed
    for i in range(0, len(sparse) - 1, 2):
        if at >= len(packed):
            break
        offset, length = sparse[i], sparse[i + 1]
        piece = packed[at : at + length][: max(size - offset, 0)]
        out[offset : offset + len(piece)] = piece
        at += length
    return bytes(out)
