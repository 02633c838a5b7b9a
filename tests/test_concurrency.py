"""Every pair of commands at once on one state directory and one store, with
real processes: a full pass in its forked rebuild, an incremental pass,
scrub, status, check and config. Each either succeeds, or waits and then
gives up with its one-line "busy" message; none fails because of the other;
afterwards every tarball has exactly one row and the state database equals
a recount of the whole index (the state package's docstring says why).

A long command is paused at a named step (basics.step: until the test
closes its stdin) while it holds what the other might disturb: the full pass with its forked reader's part
staged but not merged (the scratch file a scrub once deleted), the
incremental pass with the index read and the state directory held, the
scrub at its first row with its cursor's database open. The other command
runs to its end inside that pause. The rebuild splits at any size here
(CIS490_TEST_SPLIT_MIN_BYTES): the same code path as an index over 4 MiB.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Receiver, clean_env, parse_events, recounted, scratch_left, state_contents

HOSTS = ("robot-01", "robot-02", "robot-03")
BUSY_TIMEOUT = "0.5"  # lock_timeout of the command that comes second: it gives up inside the pause
# where each long command is paused while the other runs
PAUSED_AT = {"full": "split_joined", "pass": "caught_up", "scrub": "scrubbing"}
SHORT = ("status", "check", "config")


@dataclass
class Store:
    receiver: Receiver
    state: Path

    def argv(self, command: str) -> list[str]:
        state = ["--state-dir", str(self.state)]
        if command in ("full", "pass"):
            return self.receiver.argv("--once", *state, *(["--full"] if command == "full" else []))
        if command == "check":
            tarball = self.receiver.episodes / HOSTS[0] / "new-0.tar.zst"
            return self.receiver.argv("--json", *state, str(tarball), command="check")
        extra = ["--json"] if command == "status" else []
        return self.receiver.argv(*extra, *state, command=command)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Receiver:
    receiver = Receiver(tmp_path_factory.mktemp("template"))
    for host in HOSTS:
        for i in range(60):
            receiver.tarball(host, f"old-{i}", {"meta.json": b"{}", "data": os.urandom(64)})
            receiver.append_row(receiver.receiver_row(host, f"old-{i}"))
    return receiver


def store_with_gaps(template: Receiver, tmp_path: Path) -> Store:
    """A copy of the template after one pass (so a state database exists),
    then more tarballs without rows and rows the receiver appended since."""
    receiver = template.copy(tmp_path / "store")
    state = tmp_path / "state"
    state.mkdir()
    first = subprocess.run(Store(receiver, state).argv("pass"), capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr
    for host in HOSTS:
        for i in range(8):
            receiver.tarball(host, f"new-{i}", {"meta.json": b"{}", "data": os.urandom(64)})
        for i in range(8, 12):
            receiver.tarball(host, f"new-{i}", {"meta.json": b"{}", "data": os.urandom(64)})
            receiver.append_row(receiver.receiver_row(host, f"new-{i}"))
    return Store(receiver, state)


def start(store: Store, command: str, paused: bool, second: bool) -> subprocess.Popen[str]:
    """A paused command stops at its step until its stdin is closed (finish)."""
    env = clean_env(CIS490_TEST_SPLIT_MIN_BYTES="1")
    if paused:
        env["CIS490_TEST_PAUSE_AT"] = PAUSED_AT[command]
    argv = store.argv(command) + (["--lock-timeout", BUSY_TIMEOUT] if second else [])
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_until_paused(proc: subprocess.Popen[str], step: str) -> str:
    """Read the paused command's stderr until it says it is at its step."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60
    while f"paused at {step}" not in seen:
        assert proc.poll() is None, f"ended before {step}: {seen}"
        assert time.monotonic() < deadline, seen
        if select.select([proc.stderr], [], [], 1.0)[0]:
            seen += proc.stderr.readline()
    return seen


@dataclass
class Ended:
    command: str
    code: int
    stdout: str
    stderr: str

    def events(self) -> list[dict]:
        return parse_events(self.stdout)

    def busy(self) -> bool:
        """Gave up in one line because the other holds what it needs."""
        if self.command in ("full", "pass"):
            failed = [e for e in self.events() if e["event"] == "pass_failed"]
            return (
                self.code == 1
                and len(failed) == 1
                and "another pass holds the state directory" in str(failed[0]["error"])
            )
        if self.command == "scrub":
            return self.code == 1 and [e["event"] for e in self.events()] == ["scrub_already_running"]
        return False

    def succeeded(self) -> bool:
        events = [e["event"] for e in self.events()] if self.command in ("full", "pass", "scrub") else []
        if self.command in ("full", "pass"):
            return self.code == 0 and "pass_finished" in events and "pass_failed" not in events
        if self.command == "scrub":
            return self.code == 0 and "scrub_finished" in events and "scrub_failed" not in events
        if self.command == "status":  # 1 only says something needs attention (the gaps)
            return self.code in (0, 1) and self.stderr == "" and "hosts" in json.loads(self.stdout)
        if self.command == "check":
            return self.code == 0 and json.loads(self.stdout)["verdict"] == "intact"
        return self.code == 0 and "episodes_root = " in self.stdout  # config


def finish(proc: subprocess.Popen[str], command: str, already: str = "") -> Ended:
    stdout, stderr = proc.communicate(timeout=120)  # closes its stdin: a paused command goes on
    return Ended(command, proc.returncode, stdout, already + stderr)


PAIRS = [(first, second) for first in PAUSED_AT for second in (*PAUSED_AT, *SHORT)]
PAIRS += [(a, b) for i, a in enumerate(SHORT) for b in SHORT[i:]]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_two_commands_at_once(template: Receiver, tmp_path: Path, first: str, second: str) -> None:
    store = store_with_gaps(template, tmp_path)
    paused = first in PAUSED_AT
    one = start(store, first, paused, second=False)
    said = wait_until_paused(one, PAUSED_AT[first]) if paused else ""
    two = start(store, second, paused=False, second=True)
    other = finish(two, second)
    overlapped = one.poll() is None  # the second ended while the first was still at work
    this = finish(one, first, said)

    assert overlapped or not paused
    assert this.succeeded(), (this.code, this.stdout, this.stderr)
    # the second may only be turned away by the first holding what both need
    both_passes = {first, second} <= {"full", "pass"}
    both_scrubs = first == second == "scrub"
    if both_passes or both_scrubs:
        assert other.busy(), (other.code, other.stdout, other.stderr)
        assert len(other.stderr.splitlines()) == 0
    else:
        assert other.succeeded(), (other.code, other.stdout, other.stderr)
    assert_whole(store)


def assert_whole(store: Store) -> None:
    """A pass after both finds nothing left to do but what it always does,
    every tarball has one row, nothing is glued, and the state database is
    what a recount of the whole index gives."""
    last = subprocess.run(store.argv("pass"), capture_output=True, text=True, timeout=60)
    assert last.returncode == 0, last.stdout + last.stderr
    receiver = store.receiver
    keys = receiver.keys()  # every line parses: nothing glued, nothing torn
    on_disk = sorted(
        (p.parent.name, p.name.removesuffix(".tar.zst")) for p in receiver.episodes.glob("*/*.tar.zst")
    )
    assert sorted(keys) == on_disk, "a row missing or duplicated"
    assert state_contents(store.state) == state_contents(recounted(receiver, store.state.parent / "recount"))


def test_a_scrub_status_and_a_second_pass_during_a_forked_rebuild(template: Receiver, tmp_path: Path) -> None:
    """The reproduction from the field: the nightly scrub met the daily full
    pass while its forked reader's part waited to be merged, removed the
    scratch file, and the pass failed with "no such table: split.staging"."""
    store = store_with_gaps(template, tmp_path)
    index_before = store.receiver.index.read_bytes()
    full = start(store, "full", paused=True, second=False)
    said = wait_until_paused(full, "split_joined")
    staged = {"state.sqlite3-stage", "state.sqlite3-split"}  # the pass's and its forked reader's keys
    assert staged <= {Path(p).name for p in scratch_left(store.state)}
    others = [finish(start(store, c, paused=False, second=True), c) for c in ("scrub", "status", "pass")]
    assert staged <= {Path(p).name for p in scratch_left(store.state)}  # nobody but their owner touches them
    assert full.poll() is None
    done = finish(full, "full", said)

    assert done.succeeded(), (done.code, done.stdout, done.stderr)
    scrub, status, second = others
    assert scrub.succeeded() and status.succeeded(), (scrub.stdout, status.stdout)
    assert second.busy(), second.stdout
    appended = store.receiver.index.read_bytes()[len(index_before) :].decode().splitlines()
    assert sorted(json.loads(line)["episode_id"] for line in appended) == sorted(
        f"new-{i}" for i in range(8) for _ in HOSTS
    )
    assert scratch_left(store.state) == []
    assert_whole(store)


def test_a_pass_turned_away_busy_leaves_the_record_and_metrics_of_the_running_one(
    template: Receiver, tmp_path: Path
) -> None:
    """An operator's `--once` by hand while the service's pass runs: it
    says so (pass_failed, exit 1) but changed nothing, so `status` and the
    metrics still say what the running pass and the one before it did, not
    "last pass failed" (and no alert fires for a pass that never ran)."""
    store = store_with_gaps(template, tmp_path)
    metrics = tmp_path / "reconcile.prom"
    with_metrics = ["--metrics-file", str(metrics)]
    before = subprocess.run(store.argv("pass") + with_metrics, capture_output=True, text=True, timeout=60)
    assert before.returncode == 0, before.stdout + before.stderr
    store.receiver.tarball(HOSTS[0], "later", {"meta.json": b"{}", "data": os.urandom(64)})
    metrics_before, record_before = metrics.read_bytes(), store.receiver.last_pass(store.state)
    assert record_before is not None and record_before["result"] == "ok"

    env = clean_env(CIS490_TEST_PAUSE_AT=PAUSED_AT["pass"])
    running = subprocess.Popen(
        store.argv("pass") + with_metrics,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    said = wait_until_paused(running, PAUSED_AT["pass"])  # it holds the state directory
    turned = subprocess.run(
        store.argv("pass") + with_metrics + ["--lock-timeout", BUSY_TIMEOUT],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert Ended("pass", turned.returncode, turned.stdout, turned.stderr).busy(), turned.stdout
    assert metrics.read_bytes() == metrics_before
    assert store.receiver.last_pass(store.state) == record_before
    assert running.poll() is None

    done = finish(running, "pass", said)
    assert done.succeeded(), (done.code, done.stdout, done.stderr)
    record = store.receiver.last_pass(store.state)
    assert record is not None and record["result"] == "ok" and record["backfilled"] == 1
    assert record["started_at"] != record_before["started_at"]
    assert "cis490_reconcile_last_run_success 1.0" in metrics.read_text()
    assert metrics.read_bytes() != metrics_before
