"""`status`: a read-only report of what needs attention, with exit 0 only
when there is nothing to look at."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import LockHolder, Receiver, episode, gnu_tarball, permissions_apply, zero_page

from cis490_reconcile import config, survey
from cis490_reconcile.actions import Context
from cis490_reconcile.actions import status as status_action
from cis490_reconcile.state.connection import Database
from cis490_reconcile.state.keys import Keys
from cis490_reconcile.store import HostDir, Skipped

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)


def status(receiver: Receiver, *args: str, state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = receiver.argv(*args, command="status")
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below root with its size, mtime and mode: 'writes nothing'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath, name))
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def messy_store(receiver: Receiver, tmp_path: Path) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "b")  # a gap
    receiver.tarball("h2", "g", gnu=True)  # a gap, GNU tar + zstd CLI
    receiver.tarball("h2", "cut", blob=receiver.tarball("h2", "x").read_bytes()[:-30])
    (receiver.episodes / "h2/x.tar.zst").unlink()
    gnu_tarball(receiver.episodes / "h2/long.tar.zst", episode(), ("--long=31",))  # 2 GiB window
    outside = tmp_path / "outside.tar.zst"
    outside.write_bytes(b"secret")
    (receiver.episodes / "h1/link.tar.zst").symlink_to(outside)
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.append_raw(b"\n")  # blank: not a bad line
    receiver.append_row(receiver.receiver_row("h1", "a"))  # duplicate, line 3
    receiver.append_row({"host_id": "h3", "episode_id": "gone", "schema_version": 1})  # orphan, line 4
    receiver.append_raw(b"not json\n")  # bad, line 5
    receiver.append_row({"episode_id": "old"})  # an old row without host_id


def test_json_report_of_a_messy_store(receiver: Receiver, tmp_path: Path) -> None:
    messy_store(receiver, tmp_path)
    before = snapshot(tmp_path)
    result = status(receiver, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["report_version"] == 2 and report["clean"] is False
    assert report["hosts"] == {
        "h1": {
            "tarballs": 2,
            "indexed": 1,
            "unindexed": 1,
            "in_flight": 0,
            "corrupt": 0,
            "unverifiable": 0,
            "unreadable": 0,
            "missing_rows": 0,
            "pruned_rows": 0,
            "duplicate_rows": 1,
        },
        "h2": {
            "tarballs": 3,
            "indexed": 0,
            "unindexed": 1,
            "in_flight": 0,
            "corrupt": 1,
            "unverifiable": 1,
            "unreadable": 0,
            "missing_rows": 0,
            "pruned_rows": 0,
            "duplicate_rows": 0,
        },
        "h3": {
            "tarballs": 0,
            "indexed": 0,
            "unindexed": 0,
            "in_flight": 0,
            "corrupt": 0,
            "unverifiable": 0,
            "unreadable": 0,
            "missing_rows": 1,
            "pruned_rows": 0,
            "duplicate_rows": 0,
        },
    }
    assert report["totals"]["tarballs"] == 5 and report["totals"]["unindexed"] == 2
    assert report["index_file"] == {
        "lines": 6,
        "rows": 4,
        "rows_without_host_id": 1,
        "bad_lines": 1,
        "torn_tail": False,
    }
    assert report["bad_lines"] == [
        {"line": 5, "offset": report["bad_lines"][0]["offset"], "reason": "not valid JSON"}
    ]
    assert receiver.index.read_bytes()[report["bad_lines"][0]["offset"] :].startswith(b"not json\n")
    assert report["duplicate_rows"] == [{"host_id": "h1", "episode_id": "a", "offset": 0, "rows": 2}]
    (missing,) = report["missing_rows"]
    assert (missing["host_id"], missing["episode_id"]) == ("h3", "gone")
    assert receiver.index.read_bytes()[missing["offset"] :].startswith(b'{"episode_id": "gone"')
    assert [c["path"] for c in report["corrupt"]] == ["h2/cut.tar.zst"]
    assert report["unverifiable"] == [
        {
            "path": "h2/long.tar.zst",
            "reason": "a zstd frame declares a 2.0 GiB window, over max_window (128.0 MiB)",
        }
    ]
    assert report["skipped"] == [{"path": "h1/link.tar.zst", "reason": "symlink"}]
    assert report["skipped_entries"] == 1
    assert len(report["attention"]) == 7
    assert report["last_pass"] is None
    assert snapshot(tmp_path) == before  # wrote nothing, created no lock file or state


def test_human_table_and_exit_codes(receiver: Receiver, tmp_path: Path) -> None:
    messy_store(receiver, tmp_path)
    table = status(receiver)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[2].split() == [
        "HOST",
        "TARBALLS",
        "INDEXED",
        "UNINDEXED",
        "IN",
        "FLIGHT",
        "CORRUPT",
        "UNVERIFIABLE",
        "UNREADABLE",
        "MISSING",
        "ROWS",
        "PRUNED",
        "ROWS",
        "DUP",
        "ROWS",
    ]
    assert lines[3].split() == ["h1", "2", "1", "1", "0", "0", "0", "0", "0", "0", "1"]
    assert lines[4].split() == ["h2", "3", "0", "1", "0", "1", "1", "0", "0", "0", "0"]
    assert "  line 5 (byte " in table.stdout and ": h3/gone" in table.stdout
    assert "  h1/a: 2 rows, the first at byte 0" in table.stdout
    assert lines[-1].startswith("needs attention: settled tarballs not indexed (a pass backfills them): 2; ")
    assert table.stderr == ""  # no progress bar when stderr is not a terminal


def test_the_table_shows_control_characters_never_sends_them(receiver: Receiver) -> None:
    """A row's names are the receiver's strings: an ESC in one reaches the
    operator's terminal as text, not as a command to it."""
    receiver.tarball("h1", "a")
    receiver.append_row({**receiver.receiver_row("h1", "a"), "host_id": "h\x1b[2J", "episode_id": "e\x9b1m"})
    table = status(receiver)
    assert table.returncode == 1, table.stderr
    assert not any(c in table.stdout for c in "\x1b\x9b")
    assert "  byte 0: h\\x1b[2J/e\\x9b1m\n" in table.stdout


def test_clean_after_a_pass_and_last_pass_result(receiver: Receiver, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    receiver.tarball("h2", "b", gnu=True)
    assert status(receiver, state_dir=state_dir).returncode == 1  # two gaps
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0
    result = status(receiver, "--json", state_dir=state_dir)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["clean"] is True and report["attention"] == []
    assert report["last_pass"]["result"] == "ok" and report["last_pass"]["backfilled"] == 2
    assert status(receiver, state_dir=state_dir).stdout.splitlines()[-1] == "clean"

    # a failed pass is reported, and is itself something to look at
    receiver.tarball("h1", "c")
    with LockHolder(receiver.index):
        failed = receiver.run("--state-dir", str(state_dir), "--lock-timeout", "0.2")
        assert failed.returncode == 1
        during = status(receiver, "--json", state_dir=state_dir)  # takes no lock: not blocked
    report = json.loads(during.stdout)
    assert during.returncode == 1
    assert report["last_pass"]["result"] == "failed" and "lock" in report["last_pass"]["error"]
    assert report["attention"][-1].startswith("last pass failed: ")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see which files are opened")
def test_status_and_a_dry_run_do_not_read_again_what_the_last_pass_found_unverifiable(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A pass remembers an unchanged unverifiable tarball and does not read
    it again (a --long=31 one may be gigabytes); status and a dry run, which
    see what the next pass would, must not read it either."""
    receiver.tarball("h1", "a")
    gnu_tarball(receiver.episodes / "h1/long.tar.zst", episode(), ("--long=31",))
    (tmp_path / "state").mkdir()
    state = ("--state-dir", str(tmp_path / "state"))
    assert receiver.run(*state).one("pass_finished")["unverifiable"] == 1
    reason = "a zstd frame declares a 2.0 GiB window, over max_window (128.0 MiB)"
    trace = tmp_path / "trace"
    status = receiver.argv("--json", *state, command="status")
    dry_run = receiver.argv("--dry-run", "--once", *state)
    for argv in (dry_run, status):
        strace = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace)]
        proc = subprocess.run([*strace, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == (1 if argv is status else 0), proc.stderr  # status: it needs attention
        assert "long.tar.zst" not in trace.read_text(), argv
        if argv is status:
            assert json.loads(proc.stdout)["unverifiable"] == [{"path": "h1/long.tar.zst", "reason": reason}]
        else:
            events = [json.loads(line) for line in proc.stderr.splitlines()]
            (finished,) = [e for e in events if e["event"] == "pass_finished"]
            assert (finished["unverifiable"], finished["backfilled"]) == (1, 0), proc.stderr


def test_the_last_pass_and_scrub_are_said_after_the_index_was_replaced(
    receiver: Receiver, tmp_path: Path
) -> None:
    """An index replaced since the last pass (a restore, a copy renamed over
    it) is read whole, which used to drop the state's records with its
    keys: status said no pass had run, and a failed one was no attention."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0
    scrub = receiver.argv("--state-dir", str(state_dir), command="scrub")
    assert subprocess.run(scrub, capture_output=True, timeout=60).returncode == 0
    with LockHolder(receiver.index):
        assert receiver.run("--state-dir", str(state_dir), "--lock-timeout", "0.2").returncode == 1
    receiver.replace_index()
    result = status(receiver, "--json", state_dir=state_dir)
    report = json.loads(result.stdout)
    assert report["last_pass"] is not None and report["last_pass"]["result"] == "failed", result.stdout
    assert report["last_scrub"] is not None and report["last_scrub"]["result"] == "ok"
    assert [note.split(":")[0] for note in report["attention"]] == ["last pass failed"]
    assert result.returncode == 1
    assert report["totals"]["indexed"] == 1


def test_an_index_gone_since_the_last_pass_has_no_rows(receiver: Receiver, tmp_path: Path) -> None:
    """The index moved away (rotated, restored elsewhere): status used the
    keys the last pass read from it, and said every tarball indexed and the
    store clean beside "index: 0 lines, 0 rows"."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "b")
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0
    receiver.index.rename(receiver.index.with_name("index.jsonl.1"))
    result = status(receiver, "--json", state_dir=state_dir)
    report = json.loads(result.stdout)
    assert (report["totals"]["indexed"], report["totals"]["unindexed"]) == (0, 2), result.stdout
    assert result.returncode == 1 and report["last_pass"]["result"] == "ok"
    assert not receiver.index.exists()  # status never creates it


def test_rows_repeated_since_the_last_pass_are_named(receiver: Receiver, tmp_path: Path) -> None:
    """A row the receiver repeats after the last pass is a duplicate of a
    key in the state's keys: it was counted, but named nowhere (no example
    beside "duplicate rows: 1"), and a key already duplicated in the state
    was named with its rows there only."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for name in ("a", "b"):
        receiver.tarball("h1", name)
        receiver.append_row(receiver.receiver_row("h1", name))
    receiver.append_row(receiver.receiver_row("h1", "b"))  # b: 2 rows in the state
    assert receiver.run("--state-dir", str(state_dir)).returncode == 0
    first_a, first_b = 0, len(receiver.index.read_bytes().splitlines(keepends=True)[0])
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.append_row(receiver.receiver_row("h1", "b"))
    for where in (state_dir, None):  # the state's keys and those read on; the index read whole
        result = status(receiver, "--json", state_dir=where)
        report = json.loads(result.stdout)
        assert report["totals"]["duplicate_rows"] == 3, result.stdout
        assert sorted(report["duplicate_rows"], key=lambda e: str(e["episode_id"])) == [
            {"host_id": "h1", "episode_id": "a", "offset": first_a, "rows": 2},
            {"host_id": "h1", "episode_id": "b", "offset": first_b, "rows": 3},
        ], result.stdout


def indexed_with_a_pass_between(receiver: Receiver, tmp_path: Path, count: int, before: int) -> Path:
    """`count` tarballs of h1, each with the receiver's row, and a pass with
    a state directory (returned) after the first `before`."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for i in range(count):
        if i == before:
            assert receiver.run("--state-dir", str(state_dir)).returncode == 0
        receiver.tarball("h1", f"ep{i:03d}")
        receiver.append_row(receiver.receiver_row("h1", f"ep{i:03d}"))
    return state_dir


def test_rows_the_receiver_added_since_the_last_pass_count_with_the_states(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Between passes a reader's keys are in two places: the state's (base)
    and those it read on from the checkpoint. A host whose directory is
    matched by a merge of its keys must see both, in one digest order."""
    state_dir = indexed_with_a_pass_between(receiver, tmp_path, 40, 20)

    result = status(receiver, "--json", state_dir=state_dir)
    assert result.returncode == 0, result.stdout
    totals = json.loads(result.stdout)["totals"]
    assert (totals["indexed"], totals["unindexed"], totals["missing_rows"]) == (40, 0, 0)
    dry = receiver.run("--dry-run", "--state-dir", str(state_dir))
    assert dry.stdout == ""  # no row it would append
    finished = dry.one("pass_finished")
    assert (finished["already_indexed"], finished["raced"], finished["bytes_read"]) == (40, 0, 0)


def test_a_pass_that_commits_during_a_status_is_not_counted_twice(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status reads the state of one moment: a timer's pass that commits
    between its reading the index and its listing the store (rows read on
    from the state's checkpoint, which the pass then moves) must not count
    those rows in both, nor call them missing."""
    state_dir = indexed_with_a_pass_between(receiver, tmp_path, 8, 5)
    listing = survey.Survey.list_store

    def pass_meanwhile(self: survey.Survey) -> None:
        assert receiver.run("--state-dir", str(state_dir)).returncode == 0  # reads on: 3 more keys
        listing(self)

    monkeypatch.setattr(survey.Survey, "list_store", pass_meanwhile)
    cfg = config.build(
        {"episodes_root": str(receiver.episodes), "index": str(receiver.index), "state_dir": str(state_dir)}
    )
    totals = survey.survey(cfg).totals()
    assert (totals.indexed, totals.unindexed, totals.missing_rows, totals.duplicate_rows) == (8, 0, 0, 0)


def test_missing_row_examples_cost_the_hosts_that_have_them(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One missing row among many hosts: only its host's keys are read for
    the example, and only until its one row is found (at 100M rows a scan of
    every key made a 0.3 s status minutes long)."""
    for host in ("h1", "h2", "h3"):
        for i in range(20):
            receiver.tarball(host, f"e{i}", blob=b"x")
            receiver.append_row(receiver.receiver_row(host, f"e{i}"))
    receiver.append_row({"host_id": "h2", "episode_id": "gone"})
    asked: list[tuple[int, int]] = []  # (host, keys taken)
    rows = Keys.rows

    def counted(
        self: Keys, host: int, *args: object, **kwargs: object
    ) -> Iterator[tuple[bytes, int, int | None, int]]:
        asked.append((host, 0))
        for got in rows(self, host, *args, **kwargs):  # type: ignore[arg-type]
            asked[-1] = (host, asked[-1][1] + 1)
            yield got

    monkeypatch.setattr(Keys, "rows", counted)
    cfg = config.build({"episodes_root": str(receiver.episodes), "index": str(receiver.index), "min_age": 0})
    report = survey.survey(cfg)
    assert [(m["host_id"], m["episode_id"]) for m in report.examples["missing_rows"]] == [("h2", "gone")]
    assert len(asked) == 1 and asked[0][1] <= 21, asked  # h2 alone, to its orphan at most


def failing_listing(monkeypatch: pytest.MonkeyPatch, host_id: str, after: int) -> None:
    """HostDir.entries of host_id fails with EIO after `after` good listings
    (getdents on a failing disk: nothing here makes a real one)."""
    entries = HostDir.entries
    listings = 0

    def failing(self: HostDir) -> tuple[list[str], list[Skipped]]:
        nonlocal listings
        if self.host_id == host_id:
            listings += 1
            if listings > after:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return entries(self)

    monkeypatch.setattr(HostDir, "entries", failing)


def test_a_host_directory_that_cannot_be_listed_has_no_missing_rows(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host directory opened but not listed (EIO) may hold every tarball
    its rows name: status says it skipped it and counts none of its rows
    as missing, as for one it cannot open (the listing's OSError used to
    end status in internal_error)."""
    for host in ("h1", "h2"):
        receiver.tarball(host, "a")
        receiver.append_row(receiver.receiver_row(host, "a"))
    failing_listing(monkeypatch, "h2", after=0)
    cfg = config.build({"episodes_root": str(receiver.episodes), "index": str(receiver.index)})
    report = survey.survey(cfg)
    assert report.examples["skipped"] == [{"path": "h2", "reason": "cannot list: Input/output error"}]
    assert (report.totals().indexed, report.totals().missing_rows) == (1, 0)


def test_no_orphan_is_named_from_a_listing_that_failed(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The examples list a host with orphans again; when that second
    listing fails, none of its rows is named. (The EIO escaped; a directory
    that could no longer be opened was taken as empty, its rows all named.)"""
    receiver.tarball("h1", "a")
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.append_row({"host_id": "h1", "episode_id": "gone"})
    failing_listing(monkeypatch, "h1", after=1)
    cfg = config.build({"episodes_root": str(receiver.episodes), "index": str(receiver.index)})
    report = survey.survey(cfg)
    assert report.totals().missing_rows == 1
    assert report.examples.get("missing_rows", []) == []


def test_a_state_that_fails_after_it_is_attached_is_ignored_whole(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state checked usable, then failing once attached (its owner
    rebuilt it in between, say): status goes on without it, from the index
    alone, instead of failing on a half-attached database."""
    state_dir = indexed_with_a_pass_between(receiver, tmp_path, 8, 5)
    attach = Database.attach_base

    def replaced_first(self: Database, path: Path | str) -> None:
        fresh = tmp_path / "fresh.sqlite3"
        sqlite3.connect(fresh).close()  # an owner's new file, before its first table
        os.replace(fresh, path)
        attach(self, path)

    monkeypatch.setattr(Database, "attach_base", replaced_first)
    cfg = config.build(
        {"episodes_root": str(receiver.episodes), "index": str(receiver.index), "state_dir": str(state_dir)}
    )
    totals = survey.survey(cfg).totals()
    assert (totals.indexed, totals.unindexed, totals.missing_rows, totals.duplicate_rows) == (8, 0, 0, 0)


@pytest.mark.parametrize("table", ["records", "keys", "checkpoint", "unverifiable", "bad_lines"])
def test_a_state_database_short_of_a_table_is_ignored_by_status_and_a_dry_run(
    receiver: Receiver, tmp_path: Path, table: str
) -> None:
    """A table of its schema dropped by hand (or a partial copy): status and
    a dry run ignore the state (state_ignored) and read the index whole, as
    for a file they cannot open. Both ended in an internal_error ("no such
    table: base.records") or a failed dry run."""
    state_dir = indexed_with_a_pass_between(receiver, tmp_path, 6, 3)
    receiver.tarball("h1", "new")  # a gap since the pass
    with contextlib.closing(sqlite3.connect(state_dir / "state.sqlite3")) as db, db:
        db.execute(f"DROP TABLE {table}")
    without_state = json.loads(status(receiver, "--json").stdout)
    result = status(receiver, "--json", state_dir=state_dir)
    assert result.returncode == 1 and "internal_error" not in result.stdout, result.stdout[-300:]
    report = json.loads(result.stdout)
    assert report["hosts"] == without_state["hosts"] and report["attention"] == without_state["attention"]
    dry = receiver.run("--dry-run", "--state-dir", str(state_dir))
    assert dry.returncode == 0, dry.stderr
    (reason,) = [e["reason"] for e in dry.named("state_ignored")]
    assert table in reason, reason  # found by the open's check, or at attach (keys)
    assert [json.loads(line)["episode_id"] for line in dry.stdout.splitlines()] == ["new"]


@pytest.mark.parametrize("table", ["records", "checkpoint", "hosts", "keys", "unverifiable"])
def test_a_state_database_damaged_past_its_open_is_ignored_by_status(
    receiver: Receiver, tmp_path: Path, table: str
) -> None:
    """A page of the state gone to zeros (a bad sector, a torn copy), found
    only when status reads that table: status goes on from the index alone,
    as for a file it cannot open. It ended in an internal_error ("database
    disk image is malformed")."""
    state_dir = indexed_with_a_pass_between(receiver, tmp_path, 6, 3)
    receiver.tarball("h1", "new")  # a gap since the pass
    zero_page(state_dir / "state.sqlite3", table)
    without_state = json.loads(status(receiver, "--json").stdout)
    for args in [("--json",), ("--all-orphans",)]:
        result = status(receiver, *args, state_dir=state_dir)
        assert "internal_error" not in result.stdout, result.stdout[-300:]
    report = json.loads(status(receiver, "--json", state_dir=state_dir).stdout)
    assert report["hosts"] == without_state["hosts"] and report["attention"] == without_state["attention"]


def test_a_state_database_it_cannot_read_leaves_the_last_pass_unknown_not_none(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The last pass failed (the index lock held past lock_timeout). Run by
    a user who may not read the state directory, or with a page of zeros in
    its records, status said "last pass: none recorded (no state_dir, or no
    pass yet)", hiding the failure the journal shows. It says it could not
    read the state database, and why."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    receiver.tarball("h1", "a")
    receiver.index.touch()
    with LockHolder(receiver.index, "flock"):
        failed = receiver.run("--state-dir", str(state_dir), "--lock-timeout", "0.5")
    assert failed.returncode == 1 and failed.one("pass_failed")
    assert "last pass: failed" in status(receiver, state_dir=state_dir).stdout

    state_dir.chmod(0)
    try:
        argv = permissions_apply(receiver.argv("--state-dir", str(state_dir), command="status"))
        text = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        as_json = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60).stdout
        report = json.loads(as_json)
    finally:
        state_dir.chmod(0o755)
    assert "none recorded" not in text, text
    assert "last pass and scrub: unknown, the state database was not read: " in text, text
    assert os.strerror(errno.EACCES) in report["state_ignored"] and report["last_pass"] is None

    zero_page(state_dir / "state.sqlite3", "records")
    text = status(receiver, state_dir=state_dir).stdout
    assert "none recorded" not in text and "last pass and scrub: unknown" in text, text


def test_in_flight_is_not_attention(receiver: Receiver) -> None:
    receiver.tarball("h1", "new")
    result = status(receiver, "--json", "--min-age", "3600")
    assert result.returncode == 0
    assert json.loads(result.stdout)["totals"]["in_flight"] == 1


def test_host_filter_and_missing_index(receiver: Receiver) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h2", "b")
    result = status(receiver, "--json", "--host", "h2")
    assert list(json.loads(result.stdout)["hosts"]) == ["h2"]
    assert not receiver.index.exists()  # status never creates it


def test_a_host_named_by_no_directory_and_no_row_needs_attention(receiver: Receiver) -> None:
    """A --host typo must not read as a clean store: a pass says
    host_not_found, and status says it too. A host with rows but no
    directory, or with an empty directory, is no typo."""
    receiver.tarball("h1", "a")
    receiver.append_row(receiver.receiver_row("h1", "a"))
    now = datetime.now(timezone.utc).isoformat()
    receiver.append_row({"host_id": "gone", "episode_id": "b", "received_at_wall": now})
    (receiver.episodes / "empty").mkdir()

    typo = status(receiver, "--json", "--host", "h1x")
    report = json.loads(typo.stdout)
    assert (typo.returncode, report["attention"], report["hosts"]) == (
        1,
        ["no directory and no rows for --host h1x"],
        {},
    )
    text = status(receiver, "--host", "h1x")
    assert text.returncode == 1 and "needs attention: no directory and no rows for --host h1x" in text.stdout
    for host, attention in [("h1", []), ("empty", []), ("gone", ["missing tarballs"])]:
        found = json.loads(status(receiver, "--json", "--host", host).stdout)["attention"]
        assert [note.split(" (")[0] for note in found] == attention, (host, found)


def test_an_unreadable_index_is_one_line_and_exit_1(receiver: Receiver, tmp_path: Path) -> None:
    """check_paths refuses a directory as --index; one swapped in after it
    (or any read error) still ends in one line, not a traceback."""
    receiver.tarball("h1", "a")
    (tmp_path / "swapped").mkdir()
    cfg = config.build(
        {"episodes_root": str(receiver.episodes), "index": str(tmp_path / "swapped"), "min_age": 0}
    )
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(json=True, all_orphans=False)
    ctx = Context(
        config.resolve([("value", {"episodes_root": str(receiver.episodes)})]), args, lambda: cfg, out, err
    )
    ctx.loaded = config.Loaded(cfg, {}, None)
    assert status_action.run(ctx) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == f"cis490-reconcile status: error: {tmp_path / 'swapped'}: not a regular file\n"
    assert len(err.getvalue().splitlines()) == 1


def test_pruned_rows_are_normal_missing_ones_need_attention(receiver: Receiver) -> None:
    now = time.time()
    for i, age in enumerate([5 * 86400] * 5 + [3600]):
        received = datetime.fromtimestamp(now - age, timezone.utc).isoformat()
        receiver.append_row({"host_id": "h1", "episode_id": f"gone{i}", "received_at_wall": received})
    receiver.tarball("h1", "kept")
    receiver.append_row(receiver.receiver_row("h1", "kept"))

    result = status(receiver, "--json", "--retention", "1d")
    report = json.loads(result.stdout)
    h1 = report["hosts"]["h1"]
    assert (h1["pruned_rows"], h1["missing_rows"], h1["indexed"]) == (5, 1, 1)
    assert [(m["host_id"], m["episode_id"]) for m in report["missing_rows"]] == [("h1", "gone5")]
    assert report["attention"] == ["missing tarballs (rows without a tarball, within the retention): 1"]
    assert result.returncode == 1

    everything = status(receiver, "--all-orphans", "--retention", "1d")
    assert everything.returncode == 1, everything.stderr  # as status: the missing row needs attention
    streamed = sorted((o["episode_id"], o["kind"]) for o in map(json.loads, everything.stdout.splitlines()))
    assert streamed == [(f"gone{i}", "pruned") for i in range(5)] + [("gone5", "missing")]

    older = status(receiver, "--json", "--retention", "30m")  # now the young one is past it too
    assert older.returncode == 0 and json.loads(older.stdout)["totals"]["pruned_rows"] == 6
    only_pruned = status(receiver, "--all-orphans", "--retention", "30m")
    assert only_pruned.returncode == 0 and len(only_pruned.stdout.splitlines()) == 6
    receiver.tarball("h1", "new")  # no orphan, but a tarball to backfill needs attention all the same
    assert status(receiver, "--all-orphans", "--retention", "30m").returncode == 1


def test_a_host_id_with_a_lone_surrogate_is_a_host_without_a_directory(
    receiver: Receiver, tmp_path: Path
) -> None:
    """json.loads gives "\\ud800" as a lone surrogate, which SQLite will not
    store: such a host_id used to stop every pass and status in
    internal_error. Its row is a row like any other, of a host that cannot
    have a directory: a missing row, and the passes go on."""
    receiver.tarball("h1", "a")
    receiver.append_raw(b'{"episode_id": "ep-x", "host_id": "bad\\ud800host"}\n')
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for _ in range(2):  # the host is new, then it is known
        result = receiver.run("--state-dir", str(state_dir), "--full")
        assert result.returncode == 0, result.stdout
        assert result.one("pass_finished")["backfilled"] <= 1
    assert receiver.keys()[-1] == ("h1", "a")
    proc = status(receiver, "--json", state_dir=state_dir)
    assert proc.returncode == 1, proc.stderr  # a missing row is attention
    report = json.loads(proc.stdout)
    assert report["totals"]["missing_rows"] == 1
    assert [m["episode_id"] for m in report["missing_rows"]] == ["ep-x"]
