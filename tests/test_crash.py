"""kill -9 during a pass: at random moments, many times over the same store,
and at each named step of a commit. The index never holds a duplicate or a
glued row, at worst one torn last line; the next clean pass leaves exactly one
row per tarball, and a state database that agrees with the index."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import Receiver, episode, scratch_left

from cis490_reconcile.index import encode_row
from cis490_reconcile.indexkeys import digest
from cis490_reconcile.rebuild import SPLIT_MIN_BYTES

TRIALS = int(os.environ.get("CIS490_CRASH_TRIALS", "50"))  # heavier runs: set it higher
NEW_PER_TRIAL = 8


def check_index(receiver: Receiver) -> list[tuple[str, str]]:
    """Every line but the last is a row; the last may be torn. Returns the keys."""
    if not receiver.index.exists():
        return []
    data = receiver.index.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    keys = []
    for line in complete:
        row = json.loads(line)  # never garbage, never two rows glued together
        assert line.decode() == json.dumps(row, sort_keys=True)
        keys.append((row["host_id"], row["episode_id"]))
    if tail:  # a torn last line: a prefix of one row, never more than one
        assert b"\n" not in tail and tail.count(b'{"') <= 1
    return keys


def test_kill_9_at_random_moments_never_damages_the_index(receiver: Receiver) -> None:
    rng = random.Random(490)
    made: list[tuple[str, str]] = []
    clean = receiver.run("--workers", "1")  # measure how long a pass takes here
    assert clean.returncode == 0
    outcomes = Counter()
    for trial in range(TRIALS):
        for j in range(NEW_PER_TRIAL):
            host, episode_id = f"h{j % 3}", f"t{trial:03}-{j}"
            receiver.tarball(host, episode_id, episode(os.urandom(2000)))
            made.append((host, episode_id))
        log = receiver.root / "pass.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                receiver.argv("--once", "--workers", "1" if trial % 2 else "2"), stdout=out, stderr=out
            )
            time.sleep(rng.uniform(0.05, 0.3))  # start-up, listing, verifying, committing or done
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        outcomes[_phase(proc.returncode, log.read_text())] += 1
        keys = check_index(receiver)
        assert len(keys) == len(set(keys)), f"trial {trial}: a duplicate row"
    assert _processes_under(receiver.root) == [], "a killed pass left its workers behind"
    final = receiver.run("--workers", "1")
    assert final.returncode == 0
    keys = check_index(receiver)
    assert sorted(keys) == sorted(made)
    assert receiver.index.read_bytes().endswith(b"\n")
    print(f"{TRIALS} trials: {dict(outcomes)}")
    assert outcomes["finished"] < TRIALS * 0.9, "the kills missed the passes"


def _processes_under(root: Path) -> list[int]:
    """Processes still running with `root` in their command line."""
    time.sleep(0.2)  # the kernel delivers the parent-death signal at once; let them be reaped
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if str(root).encode() in cmdline and state != "Z":
                found.append(int(pid))
    return found


def _phase(returncode: int, log: str) -> str:
    """Where the kill landed, from what the pass had logged."""
    if returncode == 0:
        return "finished"
    if "index_appended" in log:
        return "killed after its commit"
    if "pass_started" in log:
        return "killed in the pass, before its commit"
    return "killed while starting"


# --- kill -9 at named steps (basics.step) ------------------------------------------


def _database(state_dir: Path) -> tuple[list[tuple[str, bytes, int]], int]:
    """The keys the state database holds, and the offset its checkpoint covers."""
    with contextlib.closing(sqlite3.connect(state_dir / "state.sqlite3")) as db:
        keys = sorted(
            db.execute("SELECT h.name, k.digest, k.copies FROM keys k JOIN hosts h ON h.id = k.host")
        )
        (offset,) = db.execute("SELECT offset FROM checkpoint").fetchone()
    return keys, offset


@pytest.mark.parametrize("step", ["in_transaction", "index_written", "appended", "rebuilding"])
def test_kill_9_at_a_named_step_then_a_normal_pass_makes_it_whole(
    receiver: Receiver, tmp_path: Path, step: str
) -> None:
    """borg style: die at an exact step (SIGKILL, nothing flushed, no
    finalizer), then prove the next normal pass leaves one row per tarball
    and a database that agrees with the index."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for i in range(6):
        receiver.tarball(f"h{i % 2}", f"old{i}")
    assert receiver.run("--state-dir", str(state_dir), "--workers", "1").returncode == 0
    for i in range(6):  # a gap the crashed pass is to close; the receiver appends rows meanwhile
        receiver.tarball(f"h{i % 2}", f"new{i}")
        receiver.tarball("h9", f"r{i}")
        receiver.append_row(receiver.receiver_row("h9", f"r{i}"))
    argv = receiver.argv("--once", "--state-dir", str(state_dir), "--workers", "1")
    if step == "rebuilding":
        argv.append("--full")
    crashed = subprocess.run(
        argv, env={**os.environ, "CIS490_TEST_CRASH_AT": step}, capture_output=True, text=True, timeout=60
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    check_index(receiver)  # whole lines only, whatever the step

    after = receiver.run("--state-dir", str(state_dir), "--workers", "1")
    assert after.returncode == 0, after.stdout + after.stderr
    keys = check_index(receiver)
    tarballs = sorted(
        (p.parent.name, p.name.removesuffix(".tar.zst")) for p in receiver.episodes.glob("*/*.tar.zst")
    )
    assert sorted(keys) == tarballs, "exactly one row per tarball"
    held, offset = _database(state_dir)
    assert offset == receiver.index.stat().st_size
    assert [(host, copies) for host, _, copies in held] == sorted((host, 1) for host, _ in keys)
    assert {(host, digest(ep)) for host, ep in keys} == {(host, d) for host, d, _ in held}


@pytest.mark.parametrize("step", ["forked", "split_joined", "sorted", "rebuilding"])
def test_kill_9_during_a_split_rebuild(receiver: Receiver, tmp_path: Path, step: str) -> None:
    """An index over SPLIT_MIN_BYTES is rebuilt in two parts at once, the
    second by a forked process. Killed while that process reads (it dies
    with the pass), once it handed its part over, once both parts are
    sorted, or once they are merged, the next pass cleans up its scratch
    file and leaves a database that agrees with the index."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    row = {"received_at_wall": "2026-01-01T00:00:00+00:00", "schema_version": 1, "size_bytes": 1 << 20}
    rows = 0
    with open(receiver.index, "wb") as f:  # a year of pruned episodes: rows without tarballs
        while f.tell() <= SPLIT_MIN_BYTES:
            line = {
                **row,
                "host_id": f"old{rows % 7}",
                "episode_id": f"ep-{rows:08d}",
                "sha256": f"{rows:064x}",
            }
            f.write(encode_row(line))
            rows += 1
    receiver.tarball("h1", "a")
    assert receiver.run("--state-dir", str(state_dir), "--workers", "1").returncode == 0  # a split rebuild
    receiver.tarball("h1", "b")
    argv = receiver.argv("--once", "--full", "--state-dir", str(state_dir), "--workers", "1")
    crashed = subprocess.run(
        argv, env={**os.environ, "CIS490_TEST_CRASH_AT": step}, capture_output=True, text=True, timeout=120
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert _processes_under(receiver.root) == [], "the forked reader outlived its pass"
    after = receiver.run("--state-dir", str(state_dir), "--workers", "1")
    assert after.returncode == 0, after.stdout + after.stderr
    assert scratch_left(state_dir) == []
    keys = check_index(receiver)
    assert len(keys) == rows + 2 and ("h1", "a") in keys and ("h1", "b") in keys
    held, offset = _database(state_dir)
    assert offset == receiver.index.stat().st_size and len(held) == len(keys)
