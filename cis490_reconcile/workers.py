"""Verifying tarballs in parallel, in forked worker processes.

Why processes: sha256 and zstd release the GIL, but the tar headers are
parsed in Python, and on 32,000 tarballs of 64 KiB a thread pool ran slower
than one worker while forked processes scaled (re-measure: tests/bench/run.py
--only many, whose figures include --workers 1).

Why fork: the workers inherit the open store root fd, so they open files
with the same openat(O_NOFOLLOW) chain as the parent and never resolve a
path from the root again. Tasks are batches of Tarballs (a few KB pickled);
results are verdicts, the same values the serial path produces, handled in
the parent: only the parent commits, logs and talks to systemd.

The watchdog must see real progress, not a parent politely waiting on a
stuck child. Workers tick a shared counter on every read, every 8 MiB
decoded (a small file can decode to gigabytes) and every slice of a sleep
that keeps the read rate (as the serial path feeds the watchdog while its
pacer sleeps: at 64K/s split over 4 workers one 1 MiB read takes 64 s, past
WatchdogSec=60). The parent reports progress only when the counter moved or
a batch finished; a worker blocked in read() for longer than WatchdogSec
gets the service killed.

Stopping: the parent sets a shared flag; each worker checks it after every
read (1 MiB) and returns what it has done so far. Those verdicts, and the
ones back from the workers but not yet handed out when the stop came, are
what `finish` returns: the pass records them rather than read them again.
Workers ignore SIGTERM, SIGINT and SIGHUP: systemd's stop signals every
process of the unit, and a worker that died of it would fail the pass.

A worker that dies (the OOM killer, a SIGKILL) breaks the pool: every batch
not yet back fails, and the pass ends in WorkerDied with what came back,
even if a stop came too. The executor then SIGTERMs the other workers and
joins them, but they ignore that, and two of them could never exit: one
blocked writing a result the executor no longer reads, and, when the dead
one was idle, every other idle one, waiting for the task queue's lock that
the dead one held while it waited for a task (a semaphore nobody will post).
So `finish`, once every batch is back, SIGKILLs the pool's workers, dead one
or not, before it shuts the executor down: nothing is left to lose then, and
a worker found dead there (idle, or after its batch came back, which no
batch reports) still fails the pass. One death the executor cannot see: a
worker killed while it writes a batch's results (over 64 KiB, more than the
pipe holds) leaves the executor's thread reading the rest of that message
for good, so no batch ever fails (1 run in 16, and 2 in 30, when
test_faults.py killed a worker at a random moment among 1,600 small
tarballs). So whenever the parent waits and no batch came back, it looks for
a dead worker itself; finding one, it kills the others and closes its own
copy of the results pipe's write end. The executor's thread then reads what
was sent whole, meets the end of the pipe inside the torn message, and fails
every batch not back: the pass ends as for any death, without waiting for
the watchdog (or, under --once by hand, forever). Nothing else in the parent
writes to that pipe (CPython 3.10 to 3.13 wake the executor's thread
through a pipe of its own).

The read-rate limit is split evenly between the workers.

Large zstd windows (zstd --long, --ultra) come out of one SharedWindowBudget
of max_window bytes: two workers never both hold a 128 MiB window unless
max_window leaves room for both (see verify.plan_memory).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.sharedctypes import Synchronized

from . import syscalls
from .passdata import WorkerDied
from .reading import ReadPacer
from .store import Store, Tarball
from .verdicts import Decoding, Verdict
from .verify import verify_many

BATCH_FILES = 256
BATCH_BYTES = 8 << 20
# batches handed to the pool at once, per worker. The parent hands out more only between verdicts,
# and a commit keeps it away for 30-90 ms (the append and its fdatasync, the state's transaction, up
# to 1,000 row events), while a batch of 64 KiB tarballs takes a worker about 33 ms. With 2 per
# worker the workers sat idle 80-140 ms each in a many-small pass and it ended 40-50 ms later than
# with 4 (3 runs each, tests/bench/run.py's corpus); 8 gained nothing more.
IN_FLIGHT_PER_WORKER = 4
_POLL_S = 0.05
_BUDGET_POLL_S = 0.1


class _Stopped(BaseException):
    pass


class SharedWindowBudget:
    """verify.WindowBudget across forked processes: a byte count under a
    condition variable in shared memory."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, total: int) -> None:
        self._total = total
        self._used = ctx.Value("Q", 0, lock=False)
        self._cond = ctx.Condition()

    def reserve(self, n: int, wait: Callable[[], None]) -> None:
        with self._cond:
            while self._used.value and self._used.value + n > self._total:
                self._cond.wait(_BUDGET_POLL_S)
                wait()
            self._used.value += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used.value -= n
            self._cond.notify_all()


@dataclass
class _Shared:
    """What a forked worker inherits (never pickled)."""

    store: Store
    decoding: Decoding
    rate: int | None
    bytes_read: Synchronized[int]
    ticks: Synchronized[int]  # signs of life: reads, on_read(0) while decoding, pacing sleeps
    stop: Synchronized[int]


_shared: _Shared | None = None  # set in the parent just before the pool forks

_Result = tuple[Tarball, Verdict, int]  # a verdict and the bytes read for it


def _verify_batch(batch: list[Tarball]) -> list[_Result]:
    shared = _shared
    assert shared is not None, "the pool must be created with the fork start method"
    if shared.stop.value:  # queued before a stop: nothing to begin
        return []

    def check_stop() -> None:
        if shared.stop.value:
            raise _Stopped

    lock, read_total = shared.bytes_read.get_lock(), shared.bytes_read.get_obj()

    def alive(n: int = 0) -> None:
        with lock:  # the value itself, not through .value, which takes the same lock again
            read_total.value += n
            shared.ticks.value += 1
        check_stop()

    pacer = ReadPacer(shared.rate, alive)
    results: list[_Result] = []
    read = counted = 0  # bytes read in this batch; of them, for the verdicts in results

    def on_read(n: int) -> None:
        nonlocal read
        read += n
        alive(n)
        pacer.consume(n)

    with contextlib.suppress(_Stopped):  # a stop: what is done so far
        for tarball, verdict in verify_many(shared.store, batch, shared.decoding, on_read, check_stop):
            results.append((tarball, verdict, read - counted))
            counted = read
    return results


def _start_worker(parent: int) -> None:
    syscalls.die_with_parent(parent)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a stop is the parent's: it sets the shared flag


def batches(tarballs: Iterable[Tarball]) -> Iterator[list[Tarball]]:
    """Up to BATCH_FILES tarballs or BATCH_BYTES per batch: small files are
    sent many at a time, large ones one by one so they spread over workers."""
    batch: list[Tarball] = []
    size = 0
    for tarball in tarballs:
        batch.append(tarball)
        size += tarball.size
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class VerifyPool:
    """A pool of `workers` forked processes verifying tarballs from `store`."""

    def __init__(self, store: Store, workers: int, rate: int | None, decoding: Decoding) -> None:
        global _shared
        ctx = multiprocessing.get_context("fork")
        self.workers = workers
        self._bytes_read = ctx.Value("Q", 0)
        self._ticks = ctx.Value("Q", 0, lock=False)  # written under _bytes_read's lock
        # one byte the parent sets once and workers read after every read: no lock, which a worker
        # killed while it checked would hold for good, blocking the others and the parent's finish()
        self._stop = ctx.Value("b", 0, lock=False)
        share = None if rate is None else max(rate // workers, 1)
        shared_decoding = replace(decoding, budget=SharedWindowBudget(ctx, decoding.max_window))
        _shared = _Shared(store, shared_decoding, share, self._bytes_read, self._ticks, self._stop)
        self._pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_start_worker, initargs=(os.getpid(),)
        )
        self._inflight: set[Future[list[_Result]]] = set()
        self._ready: deque[_Result] = deque()  # back from the workers, not yet handed out
        self._broken = False  # a worker died

    def __enter__(self) -> VerifyPool:
        return self

    def __exit__(self, *_: object) -> None:
        global _shared
        self.finish()
        _shared = None

    @property
    def broken(self) -> bool:
        """Whether a worker died (known for sure once finish() returned)."""
        return self._broken

    @property
    def bytes_read(self) -> int:
        """Bytes the workers have read so far, finished or not: for the
        status line, read without the lock, which a worker killed while it
        counted would hold for good (the value is one aligned word)."""
        return int(self._bytes_read.get_obj().value)

    def results(self, tarballs: Iterable[Tarball], tick: Callable[[bool], None]) -> Iterator[_Result]:
        """Verdicts as batches finish. tick(progressed) is called at least
        every _POLL_S; progressed says whether any worker ticked (read,
        decoded on, or slept to keep the rate) or a batch finished since the
        last tick. tick may raise to stop: what came back stays for finish()."""
        todo = batches(tarballs)
        seen = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(self._inflight) < IN_FLIGHT_PER_WORKER * self.workers:
                    batch = next(todo, None)
                    if batch is None:
                        exhausted = True
                    else:
                        self._inflight.add(self._pool.submit(_verify_batch, batch))
                if not self._inflight:
                    return
                done, self._inflight = wait(self._inflight, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                if not done:
                    self._end_a_silent_death()
                self._collect(done)
                now = self._ticks.value
                tick(bool(done) or now != seen)
                seen = now
                while self._ready:
                    yield self._ready.popleft()
        except BrokenProcessPool as e:  # from a batch, or from submit once the pool is broken
            self._broken = True
            raise WorkerDied from e

    def _collect(self, futures: set[Future[list[_Result]]]) -> None:
        """Keep the verdicts of the finished batches, then raise the failure
        of any (BrokenProcessPool: a worker died)."""
        for future in futures:
            if future.exception() is None:
                self._ready.extend(future.result())
        for future in futures:
            future.result()

    def finish(self) -> list[_Result]:
        """Stop the workers and wait for them. The verdicts results() has not
        handed out (a stop or a failure came first): those back already, and
        what each worker verified of its batch before it saw the stop. Empty
        after results() ran to its end."""
        self._stop.value = 1
        # No batch is cancelled: one not yet begun returns at once (it sees the stop first), and
        # the executor of 3.10 and 3.11 fails on a cancelled batch if a worker dies then.
        while wait(self._inflight, timeout=_POLL_S).not_done:  # a worker returns at its next read
            self._end_a_silent_death()
        inflight, self._inflight = self._inflight, set()
        try:
            self._collect(inflight)
        except BrokenProcessPool:
            self._broken = True
        finally:  # a batch's other failure (results() raised it first) is raised after this
            self._shut_down()
        left, self._ready = list(self._ready), deque()
        return left

    def _end_a_silent_death(self) -> None:
        """A dead worker, maybe one the executor cannot see (the module's
        docstring): kill every worker, then close the parent's copy of the
        results pipe's write end, so that every batch not back fails."""
        processes = list((self._pool._processes or {}).values())
        if all(process.exitcode is None for process in processes):
            return
        for process in processes:
            process.kill()
        writer = self._pool._result_queue._writer  # type: ignore[attr-defined]  # CPython's, 3.10 to 3.13
        writer.close()

    def _shut_down(self) -> None:
        """Every batch is back: kill the workers, then shut the executor down
        (see the module's docstring). A worker found dead here died idle, or
        after its batch came back: no batch says so."""
        processes = list((self._pool._processes or {}).values())  # None once shut down
        if any(process.exitcode is not None for process in processes):
            self._broken = True
        for process in processes:
            process.kill()
        self._pool.shutdown(wait=True)
