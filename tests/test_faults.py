"""Real faults: a full disk (a small tmpfs), an index the process may not
write (a lock never released: test_lock.py). Each pass that cannot complete exits 1
with a clear error, changes no existing byte, and a later pass converges to
exactly one row per tarball."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    LockHolder,
    Receiver,
    Result,
    as_verified,
    parse_events,
    permissions_apply,
    scratch_left,
    tmpfs,
)

from cis490_reconcile import config, passrun, rebuild
from cis490_reconcile.commit import Committed, Committer, Pending
from cis490_reconcile.coverage import Coverage
from cis490_reconcile.index import LockedIndex, backfill_row, encode_row
from cis490_reconcile.log import make_logger
from cis490_reconcile.reconcile import PassFailed, Reconciler
from cis490_reconcile.scan import GUARD_NS
from cis490_reconcile.state import FILE_NAME, State
from cis490_reconcile.verdicts import Intact

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs and chattr need root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: small enough to fill in a test."""
    with tmpfs(tmp_path / "small", "64k") as mount:
        yield mount


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk`, then give back `leave` bytes. Returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def exactly_one_row_each(receiver: Receiver, episodes: list[tuple[str, str]]) -> None:
    counts = Counter(receiver.keys_lenient())
    assert {key: counts[key] for key in episodes} == dict.fromkeys(episodes, 1)


@ROOT_ONLY
@pytest.mark.parametrize("leave", [0, 4096], ids=["no-space", "short-write"])
def test_disk_full_fails_cleanly_and_the_next_pass_converges(
    receiver: Receiver, small_disk: Path, leave: int
) -> None:
    receiver.index = small_disk / "index.jsonl"
    episodes = [(f"h{i % 2}", f"e{i:02}") for i in range(40)]
    for host, episode_id in episodes:
        receiver.tarball(host, episode_id)
    for host, episode_id in episodes[:3]:  # the receiver indexed a few
        receiver.append_row(receiver.receiver_row(host, episode_id))
    before = receiver.index.read_bytes()
    filler = fill(small_disk, leave)

    failed = receiver.run()
    assert failed.returncode == 1
    error = failed.one("pass_failed")["error"]
    assert ("No space left on device" in error) or ("short write" in error), error
    assert str(receiver.index) in error
    assert receiver.index.read_bytes().startswith(before)  # no existing byte changed

    filler.unlink()  # the operator frees space
    ok = receiver.run()
    assert ok.returncode == 0, ok.stdout
    assert receiver.index.read_bytes().startswith(before)
    exactly_one_row_each(receiver, episodes)
    assert receiver.run().one("pass_finished")["backfilled"] == 0


@ROOT_ONLY
def test_a_log_on_a_full_disk_loses_lines_not_the_pass(
    receiver: Receiver, small_disk: Path, tmp_path: Path
) -> None:
    """`cis490-reconcile --once > /mnt/small/log` on a filesystem that fills
    up: the pass used to die of ENOSPC at its next log line (exit 1, a
    traceback, no metrics, no record), wherever it was. Now the rest of the
    log is dropped, the pass ends as it would have, and stderr says how many
    log lines were lost."""
    for i in range(30):
        receiver.tarball("h1", f"e{i:02}")
    state, prom = tmp_path / "state", tmp_path / "cis490_reconcile.prom"
    state.mkdir()
    fill(small_disk, 4096)  # room for a few lines
    argv = receiver.argv("--once", "--state-dir", str(state), "--metrics-file", str(prom))
    with open(small_disk / "log", "wb") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lost = re.fullmatch(
        r"cis490-reconcile: (\d+) log line\(s\) could not be written to stdout: (.*)\n", proc.stderr
    )
    assert lost is not None and int(lost[1]) > 0 and lost[2] == "No space left on device", proc.stderr
    assert len(receiver.keys()) == 30
    assert "cis490_reconcile_last_run_success 1.0" in prom.read_text()
    assert "cis490_reconcile_last_run_rows_backfilled 30.0" in prom.read_text()
    status = subprocess.run(
        receiver.argv("--json", "--state-dir", str(state), command="status"), capture_output=True
    )
    assert json.loads(status.stdout)["last_pass"]["result"] == "ok"


@ROOT_ONLY
def test_rows_appended_before_the_state_disk_filled_are_said(receiver: Receiver, tmp_path: Path) -> None:
    """The index and the state directory on one disk (as under /var/lib), which
    fills once the rows are appended, before the state database records them
    (paused at the step "appended"). The pass fails with the full disk, but
    the rows are in the index: it says so (row_backfilled for each, and
    backfilled in pass_failed), not "0 backfilled", and the next pass,
    with space again, appends none of them a second time."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        receiver.index = disk / "index.jsonl"
        (disk / "state").mkdir()
        episodes = [("h1", f"e{i}") for i in range(3)]
        for host, episode_id in episodes:
            receiver.tarball(host, episode_id)
        argv = receiver.argv("--once", "--state-dir", str(disk / "state"), "--workers", "1")
        env = {**os.environ, "CIS490_TEST_PAUSE_AT": "appended"}
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        assert proc.stderr is not None and "paused at appended" in proc.stderr.readline()
        filler = fill(disk, 0)
        out, _ = proc.communicate(timeout=60)  # closes its stdin: it goes on
        failed = Result(proc.returncode, out, "", parse_events(out))

        assert failed.returncode == 1, out
        assert "database or disk is full" in failed.one("pass_failed")["error"]
        exactly_one_row_each(receiver, episodes)  # appended before the disk filled
        said = sorted((e["host_id"], e["episode_id"]) for e in failed.named("row_backfilled"))
        assert said == episodes, out
        assert failed.one("pass_failed")["backfilled"] == len(episodes), out

        filler.unlink()
        again = receiver.run("--state-dir", str(disk / "state"), "--workers", "1")
        assert again.returncode == 0, again.stdout
        assert again.one("pass_finished")["backfilled"] == 0
        exactly_one_row_each(receiver, episodes)


@ROOT_ONLY
def test_a_split_rebuild_that_fills_the_state_disk_keeps_the_state_database(tmp_path: Path) -> None:
    """A full pass's rebuild on two processes fills the state directory's
    disk with its scratch files. The forked reader's sort, not journaled,
    is left half written in `sorted`: the pass falls back or fails with the
    full disk, but never takes that scratch file for a damaged state
    database (state_rebuilt: the kept database discarded), and leaves no
    scratch file. Where the disk fills depends on both processes' timing:
    indexes of several sizes."""
    outcomes = []
    for rows in range(1000, 6001, 500):
        (tmp_path / f"r{rows}").mkdir()
        receiver = Receiver(tmp_path / f"r{rows}")
        lines = [encode_row({"host_id": f"h{i % 5}", "episode_id": f"e{i:06}"}) for i in range(rows)]
        receiver.index.write_bytes(b"".join(lines[:40]))
        with tmpfs(receiver.root / "state", "256k") as state_dir:
            argv = receiver.argv("--once", "--state-dir", str(state_dir), "--workers", "1")
            assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
            receiver.append_raw(b"".join(lines[40:]))
            env = {**os.environ, "CIS490_TEST_SPLIT_MIN_BYTES": "1"}
            full = subprocess.run([*argv, "--full"], capture_output=True, text=True, env=env, timeout=60)
            outcomes.append((rows, full.returncode, "state_rebuilt" in full.stdout, scratch_left(state_dir)))
    assert [o for o in outcomes if o[2] or o[3]] == [], outcomes


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_index_replaced_by_a_fifo_or_a_device_between_passes_is_refused(
    receiver: Receiver, tmp_path: Path, kind: str
) -> None:
    """The loop (one Reconciler, its paths checked once at start): the index
    replaced by a FIFO, or a symlink to /dev/null, between two passes. The
    pass read every tarball again, wrote the rows into the pipe (or the
    device), where they vanished, and failed with fdatasync's "Invalid
    argument". It is refused before anything is read, as scrub refuses it:
    "not a regular file"."""
    receiver.tarball("h1", "a")
    settings = {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0, "workers": 1}
    (tmp_path / "state").mkdir()
    cfg = config.build({**settings, "state_dir": tmp_path / "state"})
    with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
        assert reconciler.run_pass().backfilled == 1
        receiver.tarball("h1", "b")
        receiver.index.unlink()
        if kind == "fifo":
            os.mkfifo(receiver.index)
        else:
            receiver.index.symlink_to(os.devnull)

        with pytest.raises(PassFailed) as failed:
            reconciler.run_pass()

    assert failed.value.reason == f"{receiver.index}: not a regular file"
    assert failed.value.summary.bytes_read == 0  # refused before a tarball was read


@ROOT_ONLY
def test_an_index_that_may_not_be_written(receiver: Receiver) -> None:
    receiver.tarball("h1", "old")
    receiver.append_row(receiver.receiver_row("h1", "old"))
    receiver.tarball("h1", "a")
    before = receiver.index.read_bytes()
    subprocess.run(["chattr", "+i", str(receiver.index)], check=True)  # even root may not write it
    try:
        failed = receiver.run()
    finally:
        subprocess.run(["chattr", "-i", str(receiver.index)], check=True)
    assert failed.returncode == 1
    assert "Operation not permitted" in failed.one("pass_failed")["error"]
    assert receiver.index.read_bytes() == before
    assert receiver.run().returncode == 0
    assert receiver.keys() == [("h1", "old"), ("h1", "a")]


def test_a_host_directory_that_can_be_listed_but_not_searched_is_skipped(receiver: Receiver) -> None:
    """Read permission without search (mode 604): its names are listed, but
    no file in it can be looked at. That host's tarballs are skipped with a
    warning, and the other hosts are backfilled (the whole pass used to fail)."""
    receiver.tarball("good", "a")
    receiver.tarball("locked", "b")
    (receiver.episodes / "locked").chmod(0o604)
    argv = permissions_apply(receiver.argv("--once", min_age=0))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    (receiver.episodes / "locked").chmod(0o755)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    skipped = [(e["path"], e["reason"]) for e in events if e["event"] == "store_entry_skipped"]
    assert skipped == [("locked/b.tar.zst", "cannot stat: Permission denied")]
    finished = [e for e in events if e["event"] == "pass_finished"]
    assert finished and (finished[0]["backfilled"], finished[0]["skipped"]) == (1, 1), proc.stdout
    assert receiver.keys() == [("good", "a")]


@ROOT_ONLY
def test_rows_of_a_host_directory_that_cannot_be_opened_are_not_missing(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A host directory that cannot be opened (EACCES here, EIO alike) may
    hold every tarball its rows name: a full pass keeps that host's orphan
    counts of its last full pass, and status counts none of its rows as
    missing (either would raise the alert on missing rows)."""
    for host, episode_id in (("h1", "a"), ("h2", "b")):
        receiver.tarball(host, episode_id)
        receiver.append_row(receiver.receiver_row(host, episode_id))
    prom, state = tmp_path / "m.prom", ("--state-dir", str(tmp_path))
    (receiver.episodes / "h2").chmod(0o000)
    try:
        argv = permissions_apply(receiver.argv("--once", "--full", "--metrics-file", str(prom), *state))
        passed = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        argv = permissions_apply(receiver.argv("--json", *state, command="status"))
        status = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        (receiver.episodes / "h2").chmod(0o755)
    assert '"reason": "cannot open: Permission denied"' in passed.stdout, passed.stdout
    assert 'cis490_reconcile_orphan_rows{kind="missing"} 0.0' in prom.read_text()
    report = json.loads(status.stdout)
    assert (report["totals"]["missing_rows"], report["missing_rows"]) == (0, []), status.stdout


@ROOT_ONLY
def test_lost_and_found_of_a_store_on_its_own_filesystem_is_no_host(
    receiver: Receiver, tmp_path: Path
) -> None:
    """An episodes root that is a mount point holds mkfs's lost+found (root's,
    mode 700), which the service's user cannot open. It is the filesystem's,
    not a host's: no warning every pass, and status stays clean."""
    receiver.tarball("h1", "a")
    (receiver.episodes / "lost+found").mkdir(mode=0o700)
    os.chown(receiver.episodes / "lost+found", 65534, 65534)  # not the service's: it cannot open it
    state = ("--state-dir", str(tmp_path))
    passed = subprocess.run(
        permissions_apply(receiver.argv("--once", "--full", *state)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    status = subprocess.run(
        permissions_apply(receiver.argv("--json", *state, command="status")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    events = [json.loads(line) for line in passed.stdout.splitlines()]
    assert [e for e in events if e["event"] == "store_entry_skipped"] == []
    finished = [e for e in events if e["event"] == "pass_finished"]
    assert finished and (finished[0]["backfilled"], finished[0]["skipped"]) == (1, 0), passed.stdout
    report = json.loads(status.stdout)
    assert (status.returncode, report["clean"], report["skipped_entries"]) == (0, True, 0), status.stdout
    assert list(report["hosts"]) == ["h1"]


@ROOT_ONLY
def test_a_tarball_that_could_not_be_stated_is_looked_at_again(receiver: Receiver, tmp_path: Path) -> None:
    """A file the pass could not stat (EACCES here; EIO alike) is still
    unresolved: the next pass, in a directory that has not changed since,
    looks at it again instead of trusting the memo that it was gone."""
    receiver.tarball("locked", "b")
    state = ("--state-dir", str(tmp_path))
    (receiver.episodes / "locked").chmod(0o604)
    try:
        time.sleep(GUARD_NS / 1e9 + 0.2)  # so that the listing's times are remembered
        argv = permissions_apply(receiver.argv("--once", *state, min_age=0))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert '"cannot stat: Permission denied"' in proc.stdout, proc.stdout
        again = receiver.run(*state)  # as root, which may search it: the directory is unchanged
    finally:
        (receiver.episodes / "locked").chmod(0o755)
    assert again.one("pass_finished")["hosts_unchanged"] == 1, again.stdout
    assert again.one("pass_finished")["backfilled"] == 1, again.stdout
    assert receiver.keys() == [("locked", "b")]


def test_a_worker_killed_mid_pass_keeps_what_was_verified(receiver: Receiver) -> None:
    """A verifying worker SIGKILLed (as the OOM killer of a MemoryMax=
    cgroup does): the pass commits the verdicts it already has, says
    pass_failed in one line and exits 1. It used to end in internal_error
    with those rows never written."""
    for i in range(40):  # meta.json without a commit: each verdict says tarball_without_commit
        receiver.tarball("h1", f"e{i:02}", {"meta.json": b"{}", "data": os.urandom(1 << 20)})
    argv = receiver.argv("--once", "--workers", "2", "--max-read-rate", "4M", min_age=0)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    verified = 0
    while verified < 3:  # some verdicts are in, not yet committed (every 10 s or 1000 rows)
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        verified += json.loads(line)["event"] == "tarball_without_commit"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), 9)
    failed_by_a_dead_worker(receiver, proc, verified)
    assert sorted(receiver.keys()) == [("h1", f"e{i:02}") for i in range(40)]


def failed_by_a_dead_worker(
    receiver: Receiver, proc: subprocess.Popen[str], verified: int, stopped: bool = False
) -> None:
    """The pass `proc` fails in one pass_failed line (no internal_error) and
    exits 1, or 0 if it was asked to stop (README: Exit codes), having
    committed at least `verified` rows, none twice; the next pass reads the
    rest."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == (0 if stopped else 1), err
    assert "internal_error" not in {e["event"] for e in events}
    (failed,) = [e for e in events if e["event"] == "pass_failed"]
    assert "a verifying worker died" in failed["error"]
    kept = receiver.keys()
    assert len(kept) >= verified and len(set(kept)) == len(kept), kept
    assert receiver.run().returncode == 0


KILL_A_WORKER_AT_THE_FIRST_VERDICT = """
import os, signal, sys, tempfile, time
from cis490_reconcile import cli, passrun, workers

record, verify_many, killed = passrun.PassRun.record, workers.verify_many, []
flag = tempfile.mkdtemp()

def record_after_a_kill(self, tarball, verdict):
    if not killed:  # the OOM killer, while this process handles the verdicts of a batch
        killed.append(open(os.path.join(flag, "now"), "w"))
        while not os.path.exists(os.path.join(flag, "died")):
            time.sleep(0.01)
        time.sleep(1)
        if sys.argv[1] == "then-stop":  # systemd stops the unit (OOMPolicy=stop)
            os.kill(os.getpid(), signal.SIGTERM)
    record(self, tarball, verdict)

def verify_or_die(store, tarballs, *args):
    def each():
        for tarball in tarballs:
            # the first worker to begin a tarball after that dies: between two tarballs, not
            # while it writes its results, a death the executor cannot survive (workers.py)
            if os.path.exists(os.path.join(flag, "now")):
                try:
                    os.mkdir(os.path.join(flag, "died"))
                except FileExistsError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            yield tarball
    return verify_many(store, each(), *args)

passrun.PassRun.record = record_after_a_kill
workers.verify_many = verify_or_die
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("then", ["alone", "then-stop"])
@pytest.mark.parametrize(
    ("count", "size", "batch"),
    [
        pytest.param(48, 1 << 20, 8, id="batches-left-to-send"),  # 6 batches of 8 MiB (BATCH_BYTES)
        pytest.param(1600, 1000, 256, id="results-over-a-pipe"),  # 256 verdicts pickle to more than 64 KiB
    ],
)
def test_a_worker_killed_while_verdicts_are_handled(
    receiver: Receiver, count: int, size: int, batch: int, then: str
) -> None:
    """A worker killed while the pass handles a batch's verdicts. The next
    submit found the pool broken and raised past WorkerDied (internal_error,
    nothing committed); and the executor's SIGTERM, which workers ignore, left
    a worker blocked writing its results for good: the pass hung. A stop
    right after the death ended the pass as merely interrupted (the death
    unsaid). Now it fails in one line, exit 1 (0 when asked to stop), with
    every verdict that came back committed."""
    for i in range(count):
        receiver.tarball(f"h{i % 2}", f"e{i:04}", {"meta.json": b"{}", "data": os.urandom(size)})
    argv = [
        sys.executable,
        "-c",
        KILL_A_WORKER_AT_THE_FIRST_VERDICT,
        then,
        *receiver.argv("--once", "--workers", "2")[3:],
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed_by_a_dead_worker(receiver, proc, batch, then == "then-stop")  # at least the batch it was handling
    assert len(set(receiver.keys())) == len(receiver.keys()) == count


KILL_THE_IDLE_WORKER_THAT_WAITS_FOR_A_TASK = """
import multiprocessing, os, signal, sys, time
from cis490_reconcile import cli, workers

real_wait, done = workers.wait, []

def wait_then_a_death(fs, timeout=None, return_when="ALL_COMPLETED"):
    got = real_wait(fs, timeout=timeout, return_when=return_when)
    if return_when == "ALL_COMPLETED" and not got.not_done and not done:  # finish()'s: every batch is back
        done.append(1)
        time.sleep(0.3)
        # the one reading the task queue holds its lock (the others wait for it)
        reading = [p.pid for p in multiprocessing.active_children()
                   if "pipe_read" in open(f"/proc/{p.pid}/wchan").read()]
        print("reading", reading, file=sys.stderr, flush=True)
        os.kill(reading[0], signal.SIGKILL)
        time.sleep(0.5)
    return got

workers.wait = wait_then_a_death
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_idle_worker_killed_at_the_end_neither_hangs_the_pass_nor_goes_unsaid(receiver: Receiver) -> None:
    """Every batch is back and a worker dies idle (the OOM killer may pick
    it): it held the task queue's lock, so the other workers never read the
    executor's sentinels, and they ignore its SIGTERM. The pass hung in
    shutdown for good, deaf to SIGTERM. Now its workers are killed once the
    batches are back; the death still fails the pass, every row kept."""
    for i in range(8):
        receiver.tarball("h1", f"e{i}", {"meta.json": b"{}", "data": os.urandom(300_000)})
    argv = [
        sys.executable,
        "-c",
        KILL_THE_IDLE_WORKER_THAT_WAITS_FOR_A_TASK,
        *receiver.argv("--once", "--workers", "3")[3:],
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed_by_a_dead_worker(receiver, proc, 8)
    assert receiver.keys() == [("h1", f"e{i}") for i in range(8)]


TEAR_A_RESULT_THEN_DIE = """
import os, signal, struct, sys
from cis490_reconcile import cli, workers

pools, verify_many = [], workers.verify_many
real_init = workers.VerifyPool.__init__

def keep(self, *args):
    real_init(self, *args)
    pools.append(self)  # the workers fork after this, so each sees the pool

def tear_then_die(store, tarballs, *args):
    results = pools[0]._pool._result_queue
    if results._wlock.acquire(timeout=0.5):  # the first worker to take the results pipe dies in it
        # the head of a result bigger than the pipe holds, then the OOM killer
        os.write(results._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(1000))
        os.kill(os.getpid(), signal.SIGKILL)
    return verify_many(store, tarballs, *args)

workers.VerifyPool.__init__ = keep
workers.verify_many = tear_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_worker_killed_while_it_writes_its_results_fails_the_pass(receiver: Receiver) -> None:
    """A worker killed in the middle of a result bigger than the pipe (and
    holding the pipe's lock, as it would): the executor's thread waited for
    the rest of that message for good, no batch ever failed, and the pass
    made no progress until the watchdog killed it, or for ever under --once
    by hand. Now the parent sees the dead worker itself and the pass fails
    in one line; the next pass backfills every tarball."""
    for i in range(8):
        receiver.tarball("h1", f"e{i}", {"meta.json": b"{}", "data": os.urandom(1000)})
    argv = [sys.executable, "-c", TEAR_A_RESULT_THEN_DIE, *receiver.argv("--once", "--workers", "2")[3:]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed_by_a_dead_worker(receiver, proc, 0)
    assert receiver.keys() == [("h1", f"e{i}") for i in range(8)]


POOL_FAULTS = """
import json, multiprocessing, sys, time
from cis490_reconcile import workers
from cis490_reconcile.store import Store, Tarball
from cis490_reconcile.verdicts import Decoding

def failing(store, batch, *args):  # every batch fails, as verify does not expect
    raise OSError(5, "Input/output error")
    yield

def hold(pool):  # every lock of the counters the workers share with the pass
    for value in (pool._bytes_read, pool._stop, pool._ticks):
        if hasattr(value, "get_lock"):
            value.get_lock().acquire()
    time.sleep(60)

workers.verify_many = failing
found = {}
with Store(sys.argv[1]) as store:
    pool = workers.VerifyPool(store, 2, None, Decoding())
    holder = multiprocessing.get_context("fork").Process(target=hold, args=(pool,))
    holder.start()
    time.sleep(0.5)
    holder.kill()  # as a worker killed while it counted or checked for a stop: the locks stay taken
    holder.join()
    began = time.monotonic()
    found["bytes_read"] = pool.bytes_read
    found["bytes_read_s"] = time.monotonic() - began
    tarballs = [Tarball("h", f"e{i}", 4 << 20, 0, 0, 0, i) for i in range(8)]  # 4 batches of 2
    try:
        with pool:
            list(pool.results(tarballs, lambda progressed: None))
    except OSError as e:
        found["error"] = e.strerror
    found["workers_left"] = len(multiprocessing.active_children())
print(json.dumps(found))
"""


def test_the_pool_shuts_down_after_any_failure_and_never_blocks_the_status_line(tmp_path: Path) -> None:
    """Batches that fail with an error verify does not expect: the second
    seen (in finish) skipped the shutdown, and the workers stayed (one set
    more each failed pass in loop mode). And the parent's status line took
    the byte counter's lock, and every worker and the parent's finish() the
    stop flag's, which a worker killed while counting or checking holds for
    good. In a process of its own: a pass forks before any thread starts."""
    out = subprocess.run(
        [sys.executable, "-c", POOL_FAULTS, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    found = json.loads(out.stdout)
    assert found["bytes_read"] == 0 and found["bytes_read_s"] < 1, out.stderr
    assert found["error"] == "Input/output error"
    assert found["workers_left"] == 0


@contextlib.contextmanager
def _fault(kind: str, receiver: Receiver, disk: Path | None) -> Iterator[None]:
    """The index made unwritable for the length of the block: its lock held
    by another process past --lock-timeout, the file immutable (EPERM), or
    its disk full (ENOSPC)."""
    if kind == "lock":
        with LockHolder(receiver.index, "lockf"):
            yield
    elif kind == "immutable":
        subprocess.run(["chattr", "+i", str(receiver.index)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(receiver.index)], check=True)
    else:
        assert disk is not None
        filler = fill(disk, 0)
        try:
            yield
        finally:
            filler.unlink()


@pytest.mark.parametrize(
    "kind", ["lock", pytest.param("immutable", marks=ROOT_ONLY), pytest.param("disk-full", marks=ROOT_ONLY)]
)
def test_a_pass_that_fails_to_append_leaves_no_memo_that_hides_its_tarballs(
    receiver: Receiver, tmp_path: Path, kind: str
) -> None:
    """A pass that verified tarballs but could not append their rows (the
    lock held past lock_timeout, EPERM, ENOSPC) saves no memo: the next
    pass lists those host directories again, though settled and unchanged
    since, and backfills every tarball, once. Nothing a failed pass leaves
    may say a tarball is resolved whose row was never written: that would
    be a gap for good."""
    with contextlib.ExitStack() as stack:
        disk = None
        if kind == "disk-full":
            disk = stack.enter_context(tmpfs(tmp_path / "small", "64k"))
            receiver.index = disk / "index.jsonl"
        state = ("--state-dir", str(tmp_path / "state"))
        (tmp_path / "state").mkdir()
        for host in ("h1", "h2"):
            receiver.tarball(host, "old")
            receiver.append_row(receiver.receiver_row(host, "old"))
        time.sleep(GUARD_NS / 1e9 + 0.2)
        first = receiver.run(*state)
        assert first.one("pass_finished")["hosts_listed"] == 2, first.stdout
        episodes = [(host, f"e{i}") for host in ("h1", "h2") for i in range(6)]
        for host, episode_id in episodes:
            receiver.tarball(host, episode_id)
        time.sleep(GUARD_NS / 1e9 + 0.2)  # settled: a failed pass's memos would be trusted
        before = receiver.index.read_bytes()
        with _fault(kind, receiver, disk):
            failed = receiver.run(*state, "--workers", "2", "--lock-timeout", "0.5")
        assert failed.returncode == 1, failed.stdout
        assert failed.one("pass_failed")["backfilled"] == 0
        assert receiver.index.read_bytes().startswith(before)
        written = receiver.index.read_bytes()[len(before) :].count(b"\n")  # a short write's whole rows

        again = receiver.run(*state).one("pass_finished")
        assert (again["hosts_listed"], again["backfilled"]) == (2, len(episodes) - written), again
        exactly_one_row_each(receiver, [*episodes, ("h1", "old"), ("h2", "old")])
        assert receiver.run(*state).one("pass_finished")["backfilled"] == 0


def test_a_lock_timeout_between_batches_drops_only_verdicts_the_next_pass_redoes(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock taken by another process after the first batch was
    appended: the next batch's commit times out with verdicts still in the
    workers. The pass fails and keeps none of them (they could only go in
    the index), and saves no memo; the next pass verifies just the rest.
    Every tarball ends with one row."""
    episodes = [("h1", f"e{i:02}") for i in range(24)]
    for host, episode_id in episodes:
        receiver.tarball(host, episode_id)
    time.sleep(GUARD_NS / 1e9 + 0.2)  # settled: a failed pass's memos would be trusted
    (tmp_path / "state").mkdir()
    settings = {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0}
    cfg = config.build({**settings, "workers": 2, "lock_timeout": 0.5, "state_dir": tmp_path / "state"})
    monkeypatch.setattr(passrun, "BATCH_ROWS", 4)
    holders: list[LockHolder] = []
    report = passrun.PassRun._report

    def then_locked(self: passrun.PassRun, done: Committed) -> None:
        report(self, done)
        if not holders:
            holders.append(LockHolder(receiver.index, "lockf"))

    monkeypatch.setattr(passrun.PassRun, "_report", then_locked)
    try:
        with (
            Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler,
            pytest.raises(PassFailed, match="lock") as failed,
        ):
            reconciler.run_pass()
    finally:
        for holder in holders:
            holder.release()
    first = failed.value.summary.backfilled
    assert 4 <= first < len(episodes), failed.value.summary
    assert len(receiver.keys()) == first
    monkeypatch.setattr(passrun.PassRun, "_report", report)
    with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
        again = reconciler.run_pass()
    assert (again.full, again.hosts_listed, again.backfilled) == (False, 1, len(episodes) - first), again
    exactly_one_row_each(receiver, episodes)


@ROOT_ONLY
def test_a_rebuild_that_cannot_start_its_scratch_file_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state directory's disk is full when a rebuild on two processes
    makes its staging table: the pass fails with the full disk, and the
    scratch file it had opened for it is not left behind."""
    index = tmp_path / "index.jsonl"
    index.write_bytes(b"".join(encode_row({"host_id": "h", "episode_id": f"e{i}"}) for i in range(100)))
    monkeypatch.setattr(rebuild, "SPLIT_MIN_BYTES", 0)
    with tmpfs(tmp_path / "state", "1M") as disk:
        state = State.open(disk / FILE_NAME, "/episodes", str(index))
        fd = os.open(index, os.O_RDONLY)
        try:
            fill(disk, 0)
            with pytest.raises(sqlite3.OperationalError, match="full"):
                Coverage(state).catch_up(fd, full=True)
        finally:
            os.close(fd)
            state.close()
        assert scratch_left(disk) == []


def test_a_row_appended_past_the_lock_before_ours_is_kept_and_not_repeated(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer the lock did not stop (a receiver locking a lock file that
    was deleted meanwhile, a network filesystem) appends a whole row just
    before our write. The pass must not record our rows where it expected
    them: that skipped the other row, read its tail as a bad line, and the
    next pass appended a second row for its tarball."""
    episodes = [("h1", f"e{i}") for i in range(3)]
    for host, episode_id in episodes:
        receiver.tarball(host, episode_id)
    (tmp_path / "state").mkdir()
    settings = {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0}
    cfg = config.build({**settings, "state_dir": tmp_path / "state"})
    real = LockedIndex.append

    def unlocked_writer_first(self: LockedIndex, lines: list[bytes]) -> int:
        receiver.tarball("h2", "late")
        fd = os.open(receiver.index, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, encode_row(receiver.receiver_row("h2", "late")))
        finally:
            os.close(fd)
        return real(self, lines)

    monkeypatch.setattr(LockedIndex, "append", unlocked_writer_first)
    with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
        assert reconciler.run_pass().backfilled == 3
    monkeypatch.setattr(LockedIndex, "append", real)
    with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
        again = reconciler.run_pass()
    assert (again.backfilled, again.bad_index_lines) == (0, 0), again
    exactly_one_row_each(receiver, [*episodes, ("h2", "late")])


def test_a_key_twice_in_one_batch_is_appended_once(receiver: Receiver, tmp_path: Path) -> None:
    """The Committer is the last guard of "no duplicate rows": a tarball
    handed to it twice in one batch (no pass does so today) gets one row."""
    receiver.tarball("h1", "e1")
    cfg = config.build({"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0})
    opened = State.open(tmp_path / FILE_NAME, str(receiver.episodes), str(receiver.index))
    with contextlib.closing(opened) as st:
        committer = Committer(cfg, Coverage(st), lambda found: None)
        with as_verified(receiver, "h1", "e1") as (_, tarball):
            intact = Intact("0" * 64, tarball.size, None, None, 1, True)
            pending = Pending(tarball, intact, backfill_row(tarball, intact, time.time_ns()))
        done = Committed()
        committer.commit([pending, pending], lambda: None, done)
    assert (len(done.fresh), len(done.raced)) == (1, 1)
    exactly_one_row_each(receiver, [("h1", "e1")])
