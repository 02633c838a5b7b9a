"""The zstd frame format (RFC 8878), followed without decoding anything.

Why a second reader next to the decoder: zstandard's streaming reader says
nothing when a file ends early, on a block boundary or anywhere else (re-measure:
``head -c 2000000 x.tar.zst | python -c 'import sys, zstandard;
zstandard.ZstdDecompressor().stream_reader(sys.stdin.buffer).read()'`` returns
without an error). FrameWalker follows frame headers, block headers
(skipping block contents), checksums and skippable frames, so at the end of
the input it knows whether the file ends exactly at the end of a frame. It
also reads what each frame header declares, the window the decoder will
need and the dictionary it was compressed with, so the verifier can tell
"damaged" (corrupt) from "needs something we do not have" (unverifiable).
A few header bytes of state, whatever the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

MAGIC = 0xFD2FB528
DICTIONARY_MAGIC = 0xEC30A437
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_MAX_BLOCK = 128 << 10
_MAX_HEADER = 18  # magic + descriptor + window + dictionary id + content size
LEADING_SKIPPABLE = 1000  # before the first frame; more: unverifiable (no tool writes that many)
_MAGIC, _DESCRIPTOR, _HEADER_REST, _BLOCK, _CHECKSUM, _SKIP_SIZE = range(6)


class FrameHeader(NamedTuple):
    window: int  # bytes of history the decoder must keep
    dict_id: int  # 0: no dictionary
    reserved_bit: bool  # a flag this decoder (and RFC 8878) does not define


def _rest_size(descriptor: int) -> int:
    """Header bytes after the descriptor: window descriptor, dictionary id,
    frame content size."""
    single_segment = descriptor >> 5 & 1
    return (
        (0 if single_segment else 1)
        + (0, 1, 2, 4)[descriptor & 3]
        + (single_segment, 2, 4, 8)[descriptor >> 6]
    )


def parse_header(descriptor: int, rest: bytes | bytearray) -> FrameHeader:
    """A frame header from its descriptor byte and the bytes after it."""
    single_segment = descriptor >> 5 & 1
    pos = 0
    window = 0
    if not single_segment:
        exponent, mantissa = rest[0] >> 3, rest[0] & 7
        base = 1 << (10 + exponent)
        window = base + base // 8 * mantissa
        pos = 1
    id_size = (0, 1, 2, 4)[descriptor & 3]
    dict_id = int.from_bytes(rest[pos : pos + id_size], "little")
    pos += id_size
    if single_segment:  # no window descriptor: the window is the whole content
        size = int.from_bytes(rest[pos:], "little")
        window = size + 256 if len(rest) - pos == 2 else size
    return FrameHeader(window, dict_id, bool(descriptor & 0x08))


def first_header(read_at: Callable[[int, int], bytes], size: int) -> FrameHeader | None:
    """The header of the first zstd frame of a file (after any skippable
    frames), read with read_at(length, offset); None when the file does not
    start with one (FrameWalker then says why) after at most
    LEADING_SKIPPABLE skippable frames: each costs a read before any sign of
    life, and FrameWalker refuses a file with more (and must find the same
    header: the frame after exactly LEADING_SKIPPABLE of them counts)."""
    pos = 0
    for _ in range(LEADING_SKIPPABLE + 1):  # that many skippable frames, then the frame
        if pos + 5 > size:
            break
        head = read_at(_MAX_HEADER, pos)
        magic = int.from_bytes(head[:4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC and len(head) >= 8:
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != MAGIC or len(head) < 5:  # shorter than scanned: it shrank (the read then says so)
            return None
        rest = head[5 : 5 + _rest_size(head[4])]
        return parse_header(head[4], rest) if len(rest) == _rest_size(head[4]) else None
    return None


def dictionary_id(data: bytes) -> int:
    """The id of a zstd dictionary (as `zstd --train` writes it); raises
    ValueError for anything else (a raw-content dictionary has no id, so no
    frame could name it)."""
    if len(data) < 8 or int.from_bytes(data[:4], "little") != DICTIONARY_MAGIC:
        raise ValueError("not a zstd dictionary (expected one made by `zstd --train`)")
    dict_id = int.from_bytes(data[4:8], "little")
    if dict_id == 0:
        raise ValueError("a zstd dictionary with id 0 cannot be matched to frames")
    return dict_id


class FrameWalker:
    """Feed it the raw bytes in order; it checks the frame structure and
    asks `refuse` about each frame header (a reason when the frame cannot
    be decoded here, else None). The first reason is kept in `refusal`."""

    def __init__(self, refuse: Callable[[FrameHeader], str | None] = lambda _: None) -> None:
        self._refuse = refuse
        self._state, self._need, self._header = _MAGIC, 4, b""
        self._descriptor = 0
        self._skip = 0  # block or skippable-frame bytes still to pass over
        self._has_checksum = False
        self._leading = 0  # skippable frames before the first frame header; -1 after it
        self.frames = 0
        self.unchecksummed_frames = 0
        self.max_window = 0
        self.refusal: str | None = None
        self.error: str | None = None

    def feed(self, data: bytes | bytearray) -> None:
        pos, end = 0, len(data)
        while pos < end and self.error is None:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = self._need - len(self._header)
            if need > end - pos:  # a header split between two chunks: keep its start
                self._header += data[pos:]
                return
            header = data[pos : pos + need]
            if self._header:
                header, self._header = self._header + header, b""
            pos += need
            self._advance(header)

    def _expect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _advance(self, header: bytes | bytearray) -> None:
        state = self._state
        if state == _MAGIC:
            magic = int.from_bytes(header, "little")
            if magic == MAGIC:
                self._expect(_DESCRIPTOR, 1)
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._expect(_SKIP_SIZE, 4)
                self._leading += self._leading >= 0
                if self._leading > LEADING_SKIPPABLE and self.refusal is None:
                    self.refusal = f"over {LEADING_SKIPPABLE} skippable frames before the first zstd frame"
            else:
                self.error = "garbage after the last zstd frame" if self.frames else "not zstd data"
        elif state == _DESCRIPTOR:
            self._descriptor = header[0]
            self._has_checksum = bool(self._descriptor & 0x04)
            rest = _rest_size(self._descriptor)
            if rest:
                self._expect(_HEADER_REST, rest)
            else:
                self._frame_header(b"")
        elif state == _HEADER_REST:
            self._frame_header(header)
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

    def _frame_header(self, rest: bytes | bytearray) -> None:
        self._leading = -1
        frame = parse_header(self._descriptor, rest)
        self.max_window = max(self.max_window, frame.window)
        if self.refusal is None:
            self.refusal = self._refuse(frame)
        self._expect(_BLOCK, 3)

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
