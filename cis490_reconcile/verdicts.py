"""What verifying a tarball can conclude, and the limits it works within.

The verdicts (verify.py reads the bytes that lead to them):

- Intact: complete, decodes, a whole tar archive. It may be indexed.
- Corrupt: the bytes are damaged: cut short, a checksum mismatch, not zstd,
  not a tar, garbage after the last frame, empty. Structure wins: a file
  whose frames are cut short is corrupt even if it also needs a dictionary.
- Unverifiable: the bytes may be fine but cannot be checked here: a frame
  declares a window over the limit, needs a dictionary that is not
  configured, sets a header bit this decoder does not know, or a tar member's
  headers exceed tarstream.HEADER_MAX_BYTES. Never indexed, never quarantined.
- Unsettled: the file changed, was replaced or removed while it was read.
- Unreadable: open or read failed (EACCES, EIO).

Memory follows the window each frame declares (zstd allocates it and touches
it only as far as the content goes). Windows up to FREE_WINDOW (what zstd
levels 1-19 use) decode freely; a larger one first takes its size from a
WindowBudget shared by all workers, so several workers never hold several
128 MiB windows at once. plan_memory fits workers and windows under the
cgroup's memory limit. Nothing here imports zstandard: a pass with nothing
to verify does not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

from . import syscalls, zstdframe
from .basics import human_size
from .config import Config
from .preflight import load_dictionaries

if TYPE_CHECKING:
    import zstandard

FREE_WINDOW = 8 << 20  # zstd levels 1-19 need at most this; larger windows are budgeted
_FREE = nullcontext(FREE_WINDOW)
WORKER_MEMORY = 64 << 20  # what one verifying process may need besides a budgeted window
DEFAULT_MAX_WINDOW = 128 << 20  # what `zstd -d` accepts without --memory or --long


class _Verdict(Exception):
    """A verdict reached deep inside a read, raised to end it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Corrupt(_Verdict):
    """The bytes are damaged: the file can never become a valid episode
    tarball as it is."""


class Unverifiable(_Verdict):
    """The bytes may be fine, but this configuration cannot check them."""


class Intact(NamedTuple):
    sha256: str
    size: int
    commit: str | None
    commit_note: str | None  # why the row has no commit
    members: int
    checksummed: bool  # every zstd frame carried a content checksum


@dataclass(frozen=True, slots=True)
class Unsettled:
    """Changed, replaced or removed while we looked: try again next pass."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    reason: str


Verdict: TypeAlias = "Intact | Corrupt | Unverifiable | Unsettled | Unreadable"


# --- what the decoder may use ---------------------------------------------------------


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
    _decoders: dict[int, zstandard.ZstdDecompressor] = field(default_factory=dict, repr=False)

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
        """A decompressor for frames with this dictionary and window. One for
        each dictionary is kept for windows up to FREE_WINDOW (making one costs
        more than decoding a 64 KiB tarball; each stream_reader resets it). A
        larger window is a new one, freed when done: its memory was reserved
        from the budget only for that tarball."""
        if window <= FREE_WINDOW:
            kept = self._decoders.get(dict_id)
            if kept is None:
                kept = self._decoders[dict_id] = self._new_decoder(dict_id, FREE_WINDOW)
            return kept
        return self._new_decoder(dict_id, window)

    def _new_decoder(self, dict_id: int, window: int) -> zstandard.ZstdDecompressor:
        import zstandard  # not for a pass with nothing to verify: start-up time

        if not dict_id:
            return zstandard.ZstdDecompressor(max_window_size=window)
        if dict_id not in self._loaded:
            self._loaded[dict_id] = zstandard.ZstdCompressionDict(self.dictionaries[dict_id])
        return zstandard.ZstdDecompressor(dict_data=self._loaded[dict_id], max_window_size=window)

    def reserved(self, window: int, wait: Callable[[], None]) -> AbstractContextManager[int]:
        """The window size the decoder may use: windows up to FREE_WINDOW
        need no reservation (a context with nothing to do: a generator's cost
        0.8 us more, 0.6% of verifying a 64 KiB tarball), larger ones take
        theirs from the budget."""
        return _FREE if window <= FREE_WINDOW else self._reserved(window, wait)

    @contextmanager
    def _reserved(self, window: int, wait: Callable[[], None]) -> Iterator[int]:
        self.budget.reserve(window, wait)
        try:
            yield window
        finally:
            self.budget.release(window)


class MemoryPlan(NamedTuple):
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
    (preflight.check_paths has already vetted the dictionaries)."""
    plan = plan_memory(workers, cfg.max_window, syscalls.memory_limit())
    return plan, Decoding(plan.max_window, load_dictionaries(cfg.zstd_dictionaries), plan.limited_by)
