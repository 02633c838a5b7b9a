"""The command end to end, as an operator runs it: real processes, real files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from helpers import COMMIT, Receiver, episode, parse_events, permissions_apply, tar_bytes, unsearchable, zstd

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)

SCRIPT = Path(sys.executable).parent / "cis490-reconcile"
ROW_KEYS = {
    "received_at_wall",
    "host_id",
    "episode_id",
    "sha256",
    "size_bytes",
    "schema_version",
    "backfilled",
    "backfilled_at",
}


def test_console_script_runs_a_pass(receiver: Receiver) -> None:
    receiver.tarball("h1", "a")
    argv = [str(SCRIPT), *receiver.argv("--once")[3:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert parse_events(proc.stdout)[-1]["event"] == "pass_finished"
    assert receiver.keys() == [("h1", "a")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        ([], "nothing to do: pass --once"),
        (["--once", "--min-age", "-1"], "--min-age '-1': expected a finite number of seconds >= 0"),
        (["--once", "--min-age", "soon"], "--min-age 'soon': expected a number of seconds"),
        (["--once", "--lock-timeout", "0"], "--lock-timeout '0': expected a number of seconds > 0"),
        (
            ["--once", "--log-level", "loud"],
            "--log-level 'loud': expected one of debug, info, warning, error",
        ),
        (["--once", "--host", "a/b"], "--host 'a/b': expected a host directory a pass visits (unsafe"),
        (["--once", "--host", "lost+found"], "--host 'lost+found': expected a host directory a pass visits"),
        (["--once", "--episodes-root", "/nonexistent"], "--episodes-root /nonexistent: no such directory"),
        (["--once", "--episodes-root", "/etc/passwd"], "--episodes-root /etc/passwd: not a directory"),
        (["--once", "--index", "/nonexistent/dir/index.jsonl"], "directory /nonexistent/dir does not exist"),
        (["--once", "--index", "/tmp"], "--index /tmp: not a regular file"),
        (["--once", "--lock-file", "/tmp"], "--lock-file /tmp: not a regular file"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(receiver: Receiver, args: list[str], message: str) -> None:
    argv = receiver.argv(*args)
    if args and args[0] == "--bogus":
        argv.remove("--min-age")
        argv.remove("0")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cis490-reconcile: error: ")
    assert message in proc.stderr


def test_pass_backfills_rows_in_the_legacy_format(receiver: Receiver) -> None:
    path = receiver.tarball("h1", "a")
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    receiver.tarball("h1", "no-meta", {"ep/data": b"x"})
    result = receiver.run()
    assert result.returncode == 0
    rows = receiver.rows()
    assert [r["episode_id"] for r in rows] == ["a", "no-meta"]
    data = path.read_bytes()
    a = rows[0]
    assert set(a) == ROW_KEYS | {"commit"}
    assert a["received_at_wall"] == "2023-11-14T22:13:20.123456+00:00"  # the mtime
    assert a["sha256"] == hashlib.sha256(data).hexdigest()
    assert a["size_bytes"] == len(data)
    assert a["schema_version"] == 1 and a["backfilled"] is True and a["commit"] == COMMIT
    assert abs(datetime.fromisoformat(a["backfilled_at"]).timestamp() - path.stat().st_ctime) < 60
    assert set(rows[1]) == ROW_KEYS  # no commit
    warning = result.one("tarball_without_commit")
    assert warning == warning | {
        "level": "warning",
        "path": "h1/no-meta.tar.zst",
        "reason": "no meta.json member",
    }
    for line in receiver.index.read_bytes().splitlines():
        assert line.decode() == json.dumps(json.loads(line), sort_keys=True)
    backfilled = result.named("row_backfilled")
    assert [e["episode_id"] for e in backfilled] == ["a", "no-meta"]


def test_second_pass_appends_nothing(receiver: Receiver) -> None:
    for i in range(5):
        receiver.tarball(f"h{i % 2}", f"e{i}")
    receiver.tarball("h0", "broken", blob=b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    assert receiver.run().one("pass_finished")["backfilled"] == 5
    before = receiver.index.read_bytes()
    second = receiver.run().one("pass_finished")
    assert receiver.index.read_bytes() == before
    assert second["backfilled"] == 0
    assert second["already_indexed"] == 5
    assert second["corrupt"] == 1


def test_corrupt_tarballs_are_reported_and_never_indexed(receiver: Receiver) -> None:
    good = zstd(tar_bytes(episode()))
    receiver.tarball("h", "cut", blob=good[: len(good) // 2])
    receiver.tarball("h", "empty", blob=b"")
    receiver.tarball("h", "text", blob=b"hello\n")
    receiver.tarball("h", "not-tar", blob=zstd(b"hello\n" * 100))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 1
    receiver.tarball("h", "flipped", blob=bytes(flipped))
    receiver.tarball("h", "fine", gnu=True)
    result = receiver.run()
    assert result.returncode == 0  # a completed pass, even with corrupt files
    assert receiver.keys() == [("h", "fine")]
    corrupt = {e["path"]: e for e in result.named("tarball_corrupt")}
    assert set(corrupt) == {f"h/{n}.tar.zst" for n in ("cut", "empty", "text", "not-tar", "flipped")}
    assert all(e["level"] == "warning" and e["reason"] for e in corrupt.values())
    assert corrupt["h/cut.tar.zst"]["reason"] == "truncated: ends inside a zstd frame"
    assert result.one("pass_finished")["corrupt"] == 5


def test_index_problems_are_reported_and_the_torn_tail_terminated(receiver: Receiver) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h2", "a")  # indexed under h1 only: h2 still needs a row
    receiver.tarball("h1", "old")  # an old row without host_id covers it
    receiver.tarball("h1", "torn")
    receiver.tarball("h3", "e")  # its only row names host "": no row, not one for every host
    receiver.append_row(receiver.receiver_row("h1", "a"))
    receiver.append_raw(b"\n{garbage\n[1]\n")
    receiver.append_row({"episode_id": "old", "sha256": "x"})
    empty_host = len(receiver.index.read_bytes())
    receiver.append_row({"host_id": "", "episode_id": "e"})
    receiver.append_raw(json.dumps(receiver.receiver_row("h1", "torn")).encode()[:50])
    before = receiver.index.read_bytes()
    result = receiver.run()
    assert result.returncode == 0
    after = receiver.index.read_bytes()
    assert after.startswith(before + b"\n")
    bad = [(e["line"], e["offset"], e["reason"]) for e in result.named("index_bad_line")]
    first = len(before.splitlines()[0]) + 1
    torn = len(before) - 50  # once terminated, the torn garbage is a bad line of its own
    assert bad == [
        (3, first + 1, "not valid JSON"),
        (4, first + 10, "not a JSON object"),
        (6, empty_host, "an empty host_id"),
        (7, torn, "not valid JSON"),
    ]
    assert result.one("index_torn_tail")["line"] == 7
    assert result.named("index_torn_tail_terminated")
    appended = [json.loads(line) for line in after[len(before) + 1 :].splitlines()]
    assert sorted((r["host_id"], r["episode_id"]) for r in appended) == [
        ("h1", "torn"),
        ("h2", "a"),
        ("h3", "e"),
    ]
    summary = result.one("pass_finished")
    assert summary["bad_index_lines"] == 4
    assert summary["already_indexed"] == 2


def test_dry_run_prints_every_row_and_writes_nothing(receiver: Receiver) -> None:
    for i in range(7):
        receiver.tarball("h", f"e{i}")
    receiver.append_raw(b'{"torn')
    before = receiver.index.read_bytes()
    result = receiver.run("--dry-run")
    assert result.returncode == 0
    assert receiver.index.read_bytes() == before
    printed = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds only rows
    assert [r["episode_id"] for r in printed] == [f"e{i}" for i in range(7)]
    assert result.one("pass_finished")["dry_run"] is True
    assert len(result.named("row_would_backfill")) == 7
    real = receiver.run()
    assert len(real.named("row_backfilled")) == 7
    after = receiver.index.read_bytes()
    assert after.startswith(before + b"\n")
    appended = [json.loads(line) for line in after[len(before) + 1 :].splitlines()]

    def strip(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "backfilled_at"}

    assert [strip(r) for r in printed] == [strip(r) for r in appended]


def test_a_dry_run_that_may_not_read_the_state_directory_goes_on_without_it(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The units make the state directory 0750, the service user's: an
    operator's dry run as another user cannot even stat the database in it.
    It used to end in an internal_error (exit 1); it is state_ignored, as for
    a database it cannot open."""
    receiver.tarball("h", "a")
    state = tmp_path / "state"
    state.mkdir()
    assert receiver.run("--state-dir", str(state)).returncode == 0
    receiver.tarball("h", "b")
    state.chmod(0)
    try:
        argv = permissions_apply(receiver.argv("--once", "--dry-run", "--state-dir", str(state)))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        state.chmod(0o750)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["episode_id"] for line in proc.stdout.splitlines()] == ["b"]
    events = parse_events(proc.stderr)
    assert [e["event"] for e in events if e["event"] in ("state_ignored", "pass_finished")] == [
        "state_ignored",
        "pass_finished",
    ]


def test_an_episodes_root_that_cannot_be_searched_is_one_line_and_exit_2(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A root under a directory this user may not search is a bad path like
    a missing one: it used to be an internal_error traceback and exit 1."""
    with unsearchable(tmp_path, "episodes") as episodes:
        argv = permissions_apply(receiver.argv("--once", "--episodes-root", str(episodes)))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout
    assert proc.stderr == f"cis490-reconcile: error: --episodes-root {episodes}: Permission denied\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the index")
def test_root_is_refused_when_the_index_belongs_to_another_user(receiver: Receiver) -> None:
    receiver.tarball("h", "a")
    receiver.index.write_bytes(b"")
    os.chown(receiver.index, 4242, 4242)
    refused = receiver.run()
    assert refused.returncode == 2
    assert "refusing to run as root" in refused.stderr and "uid 4242" in refused.stderr
    assert "--allow-root" in refused.stderr
    assert receiver.run("--dry-run").returncode == 0  # read-only is fine
    assert receiver.index.read_bytes() == b""
    assert receiver.run("--allow-root").returncode == 0
    assert receiver.keys() == [("h", "a")]
    assert receiver.index.stat().st_uid == 4242  # appending never changes the owner


# The row contract with the receiver and every downstream reader, stated as facts (the legacy
# cis490-index-backfill tool wrote these rows; its copy is not kept here):
# - one JSON object per line, json.dumps(row, sort_keys=True): ", " and ": " separators, ASCII with
#   \\uXXXX escapes, then "\\n";
# - keys received_at_wall, host_id, episode_id, sha256 (hex of the bytes on disk), size_bytes,
#   schema_version (1), backfilled (true), commit (40 lowercase hex, only when meta.json has one);
#   we add backfilled_at;
# - received_at_wall and backfilled_at as datetime.isoformat() in UTC: 2023-11-14T22:13:20.123456+00:00.
# The golden tarballs are fixed bytes (zstd output varies between library versions), so their rows are too.
GOLDEN = {
    "golden": (
        "KLUv/WQAJ60EAALHFxlgrQ72n6j2Ab+RHgAA9spQBNsMQgFBCpcBqltzVCbAjfPZhadpLREqyTMKRwwtNPb1yDnVsWiV18YI"
        "ibAqS+Kf7XsuxFd8x3/fuW5DMz5jP3cTZ1pvA7wnzoBG6FQmEyDAcKq5GP1PD4Wuwsuk4yeEsdU53+gJB0gX0FKVHIPLAalg"
        "zaUOuCypdYHAQQdYmAIYOCJaCw==",
        b'{"backfilled": true, "backfilled_at": "NOW", "commit": "0123456789abcdef0123456789abcdef01234567", '
        b'"episode_id": "golden", "host_id": "h1", "received_at_wall": "2023-11-14T22:13:20.123456+00:00", '
        b'"schema_version": 1, "sha256": "f8e72d07521236f07974eccc85ed7230587ea1c7c3747c7f081f94c916df67e2", '
        b'"size_bytes": 163}\n',
    ),
    "bare": (
        "KLUv/WQAJ20CANIDDBCw6+SJCDzDLCQpWIW+BsIUBv7NimvPPjBRPd5/fjcHSfQXf2fqvZIJ7ajCkDismAkAhOXl5aXS+S8hzAF1"
        "eHdyFwEwKACYmAAYPNs+BA==",
        b'{"backfilled": true, "backfilled_at": "NOW", "episode_id": "bare", "host_id": "h1", '
        b'"received_at_wall": "2023-11-14T22:13:20.123456+00:00", "schema_version": 1, '
        b'"sha256": "76a8ead1ab0f5253f01f3b771e42c575ff041c7ad490064813c87a1ea0e1bd7b", "size_bytes": 91}\n',
    ),
}


def test_rows_are_the_golden_bytes_of_the_contract(receiver: Receiver) -> None:
    for episode_id, (blob, _) in GOLDEN.items():
        path = receiver.tarball("h1", episode_id, blob=base64.b64decode(blob))
        os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    assert receiver.run().returncode == 0
    lines = receiver.index.read_bytes().splitlines(keepends=True)
    got = {json.loads(line)["episode_id"]: line for line in lines}
    for episode_id, (_, golden) in GOLDEN.items():
        line = got[episode_id]
        now = json.loads(line)["backfilled_at"]
        assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", now)
        assert line == golden.replace(b"NOW", now.encode())


def test_demo_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(SCRIPT), "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "== result: 3 rows backfilled, 1 corrupt tarball reported, 1 left in flight" in proc.stdout
    assert "second pass appended 0" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # cleaned up


SLOW_FIRST_PASS = """
import sys, time
from cis490_reconcile import cli
from cis490_reconcile.actions import demo

run_pass = demo.Reconciler.run_pass

def slow(self):
    summary = run_pass(self)
    time.sleep(demo.SETTLE_S + 0.2)  # a loaded machine: the first pass outlasts the guard
    return summary

demo.Reconciler.run_pass = slow
sys.exit(cli.main(["demo"]))
"""


def test_the_demo_says_the_same_however_slow_its_first_pass(tmp_path: Path) -> None:
    """The demo's in-flight tarball settled when its first pass took longer
    than the demo's 1 s guard (CI beside other jobs): the second pass then
    appended it, and the demo's point, a second pass appends nothing, was
    lost. Its upload now goes on until the second pass."""
    env = os.environ | {"TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SLOW_FIRST_PASS], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "1 left in flight" in proc.stdout and "second pass appended 0" in proc.stdout, proc.stdout[-300:]


def test_workers_give_the_same_rows_as_one_process(receiver: Receiver, tmp_path: Path) -> None:
    """The pool is a speed-up only: same rows, same counts, any worker count."""
    for i in range(150):
        receiver.tarball(f"h{i % 3}", f"e{i:03}", gnu=i % 50 == 0)
    receiver.tarball("h1", "cut", blob=receiver.tarball("h1", "whole").read_bytes()[:-7])
    receiver.tarball("h2", "junk", blob=b"not a tarball")
    twin = receiver.copy(tmp_path / "twin")
    one = receiver.run("--workers", "1")
    many = twin.run("--workers", "3")
    assert one.returncode == many.returncode == 0
    for key in ("scanned", "backfilled", "corrupt", "bytes_read"):
        assert one.one("pass_finished")[key] == many.one("pass_finished")[key]
    assert one.one("pass_finished")["backfilled"] == 151

    def rows(r: Receiver) -> list[dict]:
        return sorted(({k: v for k, v in row.items() if k != "backfilled_at"} for row in r.rows()), key=str)

    assert rows(receiver) == rows(twin)


def test_a_pass_with_nothing_to_do_imports_only_what_it_needs(receiver: Receiver, tmp_path: Path) -> None:
    """Start-up time is most of a no-op pass: what reads tarballs (zstandard,
    tarfile, multiprocessing), prometheus_client (metrics, scrub) and the
    other subcommands are imported only when used."""
    receiver.tarball("h1", "a")
    state = tmp_path / "state"
    state.mkdir()
    assert receiver.run("--state-dir", str(state)).one("pass_finished")["backfilled"] == 1
    argv = receiver.argv("--once", "--state-dir", str(state))
    proc = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert parse_events(proc.stdout)[-1]["backfilled"] == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "cis490_reconcile.passrun" in imported  # the pass's modules are there
    lazy = (
        "zstandard",
        "tarfile",
        "multiprocessing",
        "prometheus_client",
        "cis490_reconcile.verify",
    )
    lazy += ("cis490_reconcile.actions.demo", "cis490_reconcile.actions.status", "cis490_reconcile.scrub")
    assert [name for name in lazy if name in imported] == []


def test_a_pass_whose_log_reader_goes_away_finishes_its_work(receiver: Receiver, tmp_path: Path) -> None:
    """`cis490-reconcile --once | head -1`: the pipe breaks after the first
    line. The pass used to die of BrokenPipeError at its next log line (exit
    1, a traceback), wherever it was; now the rest of the log is dropped and
    the pass ends as it would have."""
    for i in range(30):
        receiver.tarball("h1", f"e{i}")
    state = ("--state-dir", str(tmp_path))
    proc = subprocess.Popen(receiver.argv("--once", *state), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert b'"pass_started"' in proc.stdout.readline()
    proc.stdout.close()  # as head -1 does
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert re.fullmatch(
        rb"cis490-reconcile: \d+ log line\(s\) could not be written to stdout: Broken pipe\n", err
    ), err
    assert len(receiver.keys()) == 30
    finished = receiver.run(*state).one("pass_finished")
    assert (finished["backfilled"], finished["already_indexed"]) == (0, 30)
