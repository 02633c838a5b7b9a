"""Reading the whole index into new keys, on both cores.

A rebuild (a full pass, a replaced index, a new state) reads every row, and
a row's key is Python that holds the GIL, so an index over SPLIT_MIN_BYTES
is read in two parts at once: the first by this process, the rest by a
forked one. Each stages its keys (state/split.py: the scratch files, who
writes which and when); then both sort at once, this process the keys of
the hosts below a boundary straight into a new keys table, the forked one
the rest, which this process adds after its own, all in the transaction
that saves the checkpoint (state.keys.replacing).

    parent  parse [0, split) ---------- ids, boundary -- sort lower hosts into keys -- add upper
    child   parse [split, end) -- hand over ----------- sort upper hosts

Host ids. The child files the hosts it meets that the state does not know
yet under provisional ids (-1, -2, ...): only the parent writes the state.
When it is done parsing it hands back its summary and those hosts; the
parent gives them ids (the ones it met too keep theirs) and sends them with
the boundary, and both sort under those ids.

Progress: the child writes a "." for each batch it staged (the watchdog is
fed only while it moves), then its summary as one JSON line, then a "." a
second while SQLite sorts (its progress handler: connection.reporting), then
"sorted". The parent's own sorts feed the watchdog the same way.
If it fails before it hands its part over, or says nothing for
CHILD_SILENT_S (stopped, hung), the parent reads that part itself; after,
the parent reads the whole index again, alone. Leaving the
context kills the child if it still runs and removes the scratch files.

Measured on the 8M-row scale index (tests/bench/run.py --only scale, 2
vCPUs): both parts parsed and staged at once, 10.8 s; the two sorts at
once, 6.1 s; the upper hosts' keys added, 1.5 s; the commit, which writes
the keys table twice (WAL, then the database) and syncs both, 1.3 s at 450
MB/s. (Sorting the lower half into a temporary table and copying it into
the keys table after took 0.8 s more, and dropping that table 0.3 s more;
merging two halves sorted by offset took 8.6 s.)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import basics, index, syscalls
from .indexkeys import CatchUp, KeyOf, KeyReader
from .state import Key, Scratch, SplitPart, State

STAGE_BATCH = 20_000  # keys a rebuild stages at a time (about 3 MB)
# a rebuild reads part of an index this large in a forked process (the concurrency tests lower it).
# Measured on the many-small bench's first pass, which rebuilds its index before any tarball
# is verified (4 to 6 runs in turns): 5.9k rows (1.3 MB) the same either way; 11.8k (2.7 MB)
# 8 ms sooner; 22.4k (5.1 MB) 22-50 ms sooner, 2-4% of the whole pass (two sets of 6 runs).
SPLIT_MIN_BYTES = int(os.environ.get("CIS490_TEST_SPLIT_MIN_BYTES") or 4 << 20)
# a forked reader that writes nothing this long (no dot: stopped, hung) is given up on: well under the
# service's WatchdogSec=60, which the pass feeds only when the reader moves
CHILD_SILENT_S = 30.0


def rebuild(
    state: State, key: KeyOf, fd: int, st: os.stat_result, on_progress: Callable[[], None], replaced: bool
) -> CatchUp:
    """Read the whole index into new keys and a new checkpoint."""
    split = _split_point(fd, st.st_size)
    with _no_cycle_collection():
        try:
            return _rebuild(state, key, fd, st, on_progress, replaced, split)
        except _ChildFailed:  # after it handed its part over: read the whole index here
            return _rebuild(state, key, fd, st, on_progress, replaced, None)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector paused (the forked reader inherits that):
    rows and keys hold no reference cycles, so reference counting frees
    them, and the collector, run every few hundred allocations, would only
    walk them. Measured on 8M rows: both parts staged 0.37 s sooner (of 11 s)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _ChildFailed(Exception):
    pass


def _rebuild(
    state: State,
    key: KeyOf,
    fd: int,
    st: os.stat_result,
    on_progress: Callable[[], None],
    replaced: bool,
    split: int | None,
) -> CatchUp:
    reader = KeyReader(key, CatchUp(rebuilt=True, replaced=replaced))
    scratch = None if split is None else state.keys.scratch()
    with state.keys.rebuilding(scratch), contextlib.ExitStack() as stack:
        part = None if scratch is None or split is None else _ForkedPart(scratch, key, fd, split, st.st_size)
        if part is not None:
            stack.enter_context(part)
        basics.step("forked")
        _stage(reader, index.chunks(fd, 0, split or st.st_size), state.keys.stage, on_progress)
        if part is not None and not part.hand_over(reader, state, on_progress):
            part = None  # the child failed before it handed its part over: read the part here
            rest = index.chunks(fd, split or 0, st.st_size, reader.lines_before(fd, split or 0))
            _stage(reader, rest, state.keys.stage, on_progress)
        basics.step("split_joined")
        with state.keys.replacing(), state.reporting(on_progress):
            state.keys.replace(None if part is None else part.high)  # while the child sorts the upper hosts
            if part is not None:
                if not part.sorted(on_progress):
                    raise _ChildFailed
                basics.step("sorted")
                state.keys.add_sorted()
            state.keys.replaced()
            basics.step("rebuilding")
            state.keys.add_bad_lines((b.line, b.offset, b.reason) for b in reader.found.bad)
            state.keys.save_checkpoint(reader.checkpoint(fd, st, time.time()))
            if replaced:
                state.records.forget_memos()
    return reader.found


def _stage(
    reader: KeyReader,
    entries: Iterable[index.Rows | index.Entry],
    stage: Callable[[Sequence[Key]], None],
    on_progress: Callable[[], None],
) -> None:
    """Every key of `entries`, STAGE_BATCH at a time (by this process into
    its temporary table, or by the forked one into a SplitPart)."""
    for keys, _ in reader.batches(entries, STAGE_BATCH):
        stage(keys)
        on_progress()


def _split_point(fd: int, size: int) -> int | None:
    """Where the forked part of a rebuild starts: after the first newline
    past the middle. None for an index too small to be worth a process, with
    no newline in the 1 MiB after the middle, or while another thread runs
    (the verifying pool's, when a commit finds the index replaced): a fork
    then could inherit a lock that thread holds."""
    if size < SPLIT_MIN_BYTES or threading.active_count() > 1:
        return None
    middle = size // 2
    after = os.pread(fd, index.MAX_LINE_BYTES + 1, middle).find(b"\n")
    return None if after < 0 or middle + after + 1 >= size else middle + after + 1


class _ForkedPart:
    """Bytes [start, end) of the index, parsed by a forked process into a
    SplitPart while this one does the bytes before, and the keys of the
    upper hosts sorted."""

    def __init__(self, scratch: Scratch, key: KeyOf, fd: int, start: int, end: int) -> None:
        self.key, self.fd, self.start, self.end = key, fd, start, end
        self.scratch = scratch
        self.high = 0  # the boundary of the two sorts, given at the hand-over
        self.child = syscalls.fork_child(self._work)
        self._read = b""

    def __enter__(self) -> _ForkedPart:
        return self

    def __exit__(self, *_: object) -> None:
        self.child.close()
        self.scratch.remove("split", "sorted")

    def _work(self, out_fd: int, in_fd: int) -> None:
        """In the child: parse, hand over, then sort the upper hosts."""
        provisional: dict[str, int] = {}
        key = KeyOf(dict(self.key.hosts), lambda name: provisional.setdefault(name, -1 - len(provisional)))
        part = SplitPart(self.scratch)
        reader = KeyReader(key, CatchUp(), self.start)
        with os.fdopen(out_fd, "wb") as out, os.fdopen(in_fd, "rb") as given:

            def progress() -> None:
                out.write(b".")
                out.flush()

            dotted = 0.0

            def sorting() -> None:  # SQLite calls it often: a dot a second (the pipe must not fill)
                nonlocal dotted
                if time.monotonic() - dotted >= 1.0:
                    dotted = time.monotonic()
                    progress()

            _stage(reader, index.chunks(self.fd, self.start, self.end), part.stage, progress)
            part.hand_over()
            out.write(json.dumps({**reader.summary(), "hosts": provisional}).encode() + b"\n")
            out.flush()
            sent = json.loads(given.readline())
            part.sort({int(p): i for p, i in sent["ids"].items()}, sent["high"], sorting)
            out.write(b"sorted\n")

    def _until(self, marker: bytes, on_progress: Callable[[], None]) -> bytes | None:
        """What the child writes up to the next line ending in `marker`
        (progress dots stripped), or None once it closed its pipe first or
        wrote nothing for CHILD_SILENT_S."""
        heard = time.monotonic()
        while True:
            line, newline, rest = self._read.partition(b"\n")
            if newline and line.lstrip(b".").endswith(marker):
                self._read = rest
                return line.lstrip(b".")
            data = self.child.read(1.0)
            if data == b"":
                return None
            if data is not None:
                self._read += data
                heard = time.monotonic()
                on_progress()
            elif time.monotonic() - heard >= CHILD_SILENT_S:
                return None  # left to Child.close (SIGKILL works on a stopped process)

    def hand_over(self, reader: KeyReader, state: State, on_progress: Callable[[], None]) -> bool:
        """Take the child's summary and go on with `reader` after its part;
        give ids to the hosts it numbered provisionally, join its part,
        and send the ids and the boundary of the hosts it sorts. False if it
        failed before (the caller reads the part itself)."""
        line = self._until(b"}", on_progress)
        if line is None:
            return False
        part: dict[str, Any] = json.loads(line)
        ids = {provisional: self.key.host(name) for name, provisional in part["hosts"].items()}
        self.high = state.keys.join_split(self.scratch, ids)  # from here a failure reads all again
        try:
            self.child.send(json.dumps({"ids": ids, "high": self.high}).encode() + b"\n")
        except BrokenPipeError:
            raise _ChildFailed from None
        reader.add(part, self.fd, self.start, self.end)
        return True

    def sorted(self, on_progress: Callable[[], None]) -> bool:
        """Wait for the child to have sorted its part; whether it did (a
        silent one is not waited for: Child.close kills it)."""
        return self._until(b"sorted", on_progress) is not None and self.child.succeeded()
