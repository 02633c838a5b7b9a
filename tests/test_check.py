"""`check FILE...`: the pass's verifier pointed at named tarballs, through the
real command: every verdict on tarballs made by GNU tar and the zstd CLI,
the index lookup (not indexed, matches, differs), the row a pass would
append byte for byte, the exit statuses, and that it takes no lock and
writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    COMMIT,
    LockHolder,
    Receiver,
    gnu_tarball,
    measure_rss,
    permissions_apply,
    stock_members,
    stock_tarball,
)

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)


def check(receiver: Receiver, *args: str, min_age: float = 0) -> subprocess.CompletedProcess[str]:
    argv = receiver.argv(*args, command="check", min_age=min_age)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=receiver.root)


def answers(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    """--json: one object per line, one line per file."""
    return [json.loads(line) for line in proc.stdout.splitlines()]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# case -> (extra flags, verdict, reason fragment, exit status)
CASES: dict[str, tuple[tuple[str, ...], str, str, int]] = {
    "intact": ((), "intact", "", 0),
    "cut": ((), "corrupt", "truncated: ends inside a zstd frame", 1),
    "flipped": ((), "corrupt", "zstd:", 1),
    "long31": ((), "unverifiable", "declares a 2.0 GiB window, over max_window (128.0 MiB)", 3),
    "long31-2G": (("--max-window", "2G"), "intact", "", 0),
    "dict": ((), "unverifiable", "which zstd_dictionaries does not name", 3),
    "dict-configured": (("--zstd-dictionaries", "DICT"), "intact", "", 0),
}


def make(case: str, path: Path, dictionary: Path) -> None:
    """GNU tar piped into the zstd CLI, then damaged where the case says."""
    if case in ("long31", "long31-2G", "dict", "dict-configured"):
        stock_tarball(case, path, path.name.removesuffix(".tar.zst"), dictionary)
        return
    path.parent.mkdir(exist_ok=True)
    data = bytearray(gnu_tarball(path, stock_members("ep")))
    if case == "cut":
        data = data[: len(data) * 2 // 3]
    elif case == "flipped":
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(CASES))
def test_every_verdict_on_stock_tool_tarballs(
    receiver: Receiver, dictionary: Path, case: str, tmp_path: Path
) -> None:
    flags, verdict, reason, code = CASES[case]
    flags = tuple(str(dictionary) if f == "DICT" else f for f in flags)
    path = receiver.episodes / "robot-07" / f"{case}.tar.zst"
    make(case, path, dictionary)

    proc = check(receiver, "--json", *flags, str(path))

    assert proc.returncode == code, proc.stdout + proc.stderr
    (answer,) = answers(proc)
    assert (answer["verdict"], answer["host_id"], answer["episode_id"]) == (verdict, "robot-07", case)
    assert reason in (answer["reason"] or "")
    assert answer["size_bytes"] == path.stat().st_size
    assert (
        answer["sha256"]
        == subprocess.run(
            ["sha256sum", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    assert answer["index"]["found"] == "not indexed"
    if verdict == "intact":
        assert answer["commit"] == COMMIT and answer["zstd"]["frames"] >= 1 and answer["pass_would_append"]
        assert answer["zstd"]["checksummed"]  # the zstd CLI writes content checksums
    else:
        assert answer["row"] is None and not answer["pass_would_append"]
    if case.startswith("long31"):
        assert answer["zstd"]["max_window"] == 2 << 30
    # the pass agrees: a row exactly when check says intact
    assert receiver.run(*flags).returncode == 0
    assert receiver.keys_lenient() == ([("robot-07", case)] if verdict == "intact" else [])


def test_text_output_for_a_corrupt_tarball(receiver: Receiver) -> None:
    path = receiver.episodes / "robot-07" / "ep-0412.tar.zst"
    make("cut", path, Path())
    size = path.stat().st_size

    proc = check(receiver, str(path))

    assert proc.returncode == 1 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{path}: corrupt: truncated: ends inside a zstd frame"
    assert f"  size      {size} bytes" in lines[1]
    assert lines[3].startswith("  zstd      0 complete frames, largest window ")
    assert "  index     not indexed" in lines
    assert not any(line.startswith("  row") for line in lines)  # a corrupt tarball gets no row


def test_text_output_shows_control_characters_never_sends_them(receiver: Receiver) -> None:
    """Names come from shippers and tarballs: an ESC in one reaches the
    operator's terminal as text (\\x1b), not as a command to it."""
    path = receiver.tarball("robot-07", "ep\x1b]0;owned\x07", {"ep/x": b"x"})

    proc = check(receiver, str(path))

    assert proc.returncode in (0, 3), proc.stderr
    assert not any(c in proc.stdout for c in "\x1b\x07\x9b")
    assert proc.stdout.startswith(f"{receiver.episodes}/robot-07/ep\\x1b]0;owned\\x07.tar.zst: ")
    assert len(proc.stdout.splitlines()) > 3  # each line still a line


def test_the_row_is_byte_for_byte_what_a_pass_appends(receiver: Receiver) -> None:
    path = receiver.tarball("robot-07", "ep-1", gnu=True)

    (answer,) = answers(check(receiver, "--json", str(path)))
    assert receiver.run().one("pass_finished")["backfilled"] == 1

    appended = json.loads(receiver.index.read_bytes())
    predicted = json.loads(answer["row"])
    assert predicted.pop("backfilled_at") <= appended.pop("backfilled_at")  # when the pass ran
    assert predicted == appended
    assert receiver.index.read_bytes().decode().startswith(answer["row"].split('"backfilled_at"')[0])


def test_indexed_matches_or_differs(receiver: Receiver) -> None:
    good = receiver.tarball("robot-07", "good", gnu=True)
    bad = receiver.tarball("robot-07", "bad", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "good", commit=COMMIT))
    wrong = receiver.receiver_row("robot-07", "bad", size_bytes=1, sha256="ab" * 32, commit="f" * 40)
    receiver.append_row(wrong)
    offset = len(receiver.index.read_bytes().splitlines(keepends=True)[0])

    proc = check(receiver, "--json", str(good), str(bad))

    assert proc.returncode == 1  # a file that differs from its row
    first, second = answers(proc)
    assert first["index"] == {"found": "matches", "offset": 0, "differences": {}}
    assert not first["pass_would_append"]
    data = bad.read_bytes()
    assert second["index"]["found"] == "differs" and second["index"]["offset"] == offset
    assert second["index"]["differences"] == {
        "sha256": {"row": "ab" * 32, "file": second["sha256"]},
        "size_bytes": {"row": 1, "file": len(data)},
        "commit": {"row": "f" * 40, "file": COMMIT},
    }
    text = check(receiver, str(bad)).stdout
    assert f"indexed (row at byte {offset}), differs" in text
    assert f"size_bytes: row 1, file {len(data)}" in text


def test_rows_without_host_id_and_a_torn_last_line_count_as_indexed(receiver: Receiver) -> None:
    old = receiver.tarball("robot-07", "old", gnu=True)
    torn = receiver.tarball("robot-07", "torn", gnu=True)
    row = receiver.receiver_row("robot-07", "old")
    del row["host_id"]
    receiver.append_row(row)
    receiver.append_raw(json.dumps(receiver.receiver_row("robot-07", "torn"), sort_keys=True).encode())

    proc = check(receiver, "--json", str(old), str(torn))

    assert proc.returncode == 0, proc.stdout
    assert [a["index"]["found"] for a in answers(proc)] == ["matches", "matches"]


def test_uses_the_state_database_and_the_rows_since(receiver: Receiver, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    first = receiver.tarball("robot-07", "first", gnu=True)
    assert receiver.run("--state-dir", str(state)).one("pass_finished")["backfilled"] == 1
    later = receiver.tarball("robot-07", "later", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "later"))  # after the pass: not in the database
    database = state / "state.sqlite3"
    before = snapshot(receiver.episodes), receiver.index.read_bytes(), database.read_bytes(), database.stat()

    proc = check(receiver, "--json", "--state-dir", str(state), str(first), str(later))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [a["index"]["found"] for a in answers(proc)] == ["matches", "matches"]
    # nothing written: not the store, not the index, not the database (a reader of a
    # WAL database may leave SQLite's -shm and -wal beside it)
    after = snapshot(receiver.episodes), receiver.index.read_bytes(), database.read_bytes(), database.stat()
    assert after[:3] == before[:3] and after[3].st_mtime_ns == before[3].st_mtime_ns


def test_takes_no_lock_and_writes_nothing(receiver: Receiver, tmp_path: Path) -> None:
    path = receiver.tarball("robot-07", "ep", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "ep"))
    before = snapshot(tmp_path)
    with LockHolder(receiver.index, "lockf"), LockHolder(receiver.index, "flock"):
        started = time.monotonic()
        proc = check(receiver, "--lock-timeout", "1", str(path))
        took = time.monotonic() - started
    assert proc.returncode == 0 and "matches" in proc.stdout
    assert took < 10
    assert snapshot(tmp_path) == before


def test_in_flight_is_still_verified_and_says_a_pass_would_wait(receiver: Receiver) -> None:
    path = receiver.tarball("robot-07", "new", gnu=True)

    proc = check(receiver, "--json", str(path), min_age=300)

    (answer,) = answers(proc)
    assert proc.returncode == 0 and answer["verdict"] == "intact"
    assert answer["in_flight"] and 0 <= answer["age_s"] < 300 and not answer["pass_would_append"]
    text = check(receiver, str(path), min_age=300).stdout
    assert "younger than min_age (300 s): a pass would wait for it" in text


def test_symlinks_and_other_files_are_refused_never_opened(receiver: Receiver, tmp_path: Path) -> None:
    target = receiver.tarball("robot-07", "real", gnu=True)
    link = receiver.episodes / "robot-07" / "link.tar.zst"
    link.symlink_to(target)
    fifo = receiver.episodes / "robot-07" / "fifo.tar.zst"
    subprocess.run(["mkfifo", str(fifo)], check=True)
    missing = receiver.episodes / "robot-07" / "gone.tar.zst"

    proc = check(receiver, "--json", str(link), str(fifo), str(missing))

    assert proc.returncode == 3, proc.stdout  # nothing damaged, nothing decided
    got = [(a["verdict"], a["reason"], a["sha256"]) for a in answers(proc)]
    assert got == [
        ("unreadable", "symlink: never opened", None),
        ("unreadable", "fifo: never opened", None),
        ("unreadable", "no such file", None),
    ]


def test_a_store_file_that_is_gone_or_refused_is_still_looked_up(receiver: Receiver) -> None:
    """The file a scrub_missing alert named, or a symlink a pass skipped: in
    the store, so the index is asked about it. It was not, and the answer
    said the file "is not <episodes_root>/<host_id>/<episode_id>.tar.zst"."""
    receiver.tarball("robot-07", "gone", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "gone"))
    gone = receiver.episodes / "robot-07" / "gone.tar.zst"
    gone.unlink()
    link = receiver.episodes / "robot-07" / "link.tar.zst"
    link.symlink_to(receiver.tarball("robot-07", "real", gnu=True))

    proc = check(receiver, "--json", str(gone), str(link))

    assert proc.returncode == 3, proc.stdout
    got = [(a["verdict"], a["reason"], a["under_episodes_root"], a["index"]) for a in answers(proc)]
    assert got == [
        ("unreadable", "no such file", True, {"found": "not compared", "offset": 0, "differences": {}}),
        (
            "unreadable",
            "symlink: never opened",
            True,
            {"found": "not indexed", "offset": None, "differences": {}},
        ),
    ]
    text = check(receiver, str(gone), str(link)).stdout
    assert "indexed (row at byte 0), not compared" in text and "the file is not" not in text


def test_a_name_no_pass_would_look_at_is_a_usage_error(receiver: Receiver) -> None:
    """A file not named <episode_id>.tar.zst is never a pass's business: one
    line and exit 2, before anything is opened (not "no such file" about a
    <name>.tar.zst nobody asked for)."""
    good = receiver.tarball("robot-07", "real", gnu=True)
    misnamed = good.with_name("real.tar")
    misnamed.write_bytes(good.read_bytes())

    proc = check(receiver, str(good), str(misnamed))

    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"cis490-reconcile: error: check {misnamed}: not an episode tarball (<episode_id>.tar.zst)"
    ], proc.stderr


def test_a_file_outside_the_store_is_verified_not_looked_up(receiver: Receiver, tmp_path: Path) -> None:
    elsewhere = tmp_path / "incoming" / "robot-09"
    elsewhere.mkdir(parents=True)
    path = elsewhere / "ep-7.tar.zst"
    gnu_tarball(path, stock_members("ep-7"))

    proc = check(receiver, "--json", str(path))

    (answer,) = answers(proc)
    assert proc.returncode == 0 and answer["verdict"] == "intact"
    assert (answer["under_episodes_root"], answer["index"], answer["host_id"]) == (False, None, "robot-09")
    assert json.loads(answer["row"])["host_id"] == "robot-09"
    assert "not looked up" in check(receiver, str(path)).stdout


def test_a_store_file_a_pass_skips_says_so_and_offers_no_row(receiver: Receiver) -> None:
    """A dot-name, lost+found, an unsafe episode or host name (control
    character, not UTF-8): files in the store that a pass passes over. check
    offered the row "a pass would append" (for lost+found even as "not
    indexed", exit 0), which no pass ever does. It says the pass's reason
    (the one store_entry_skipped logs), no row, exit 3: never indexed."""
    names = {
        "dot": ("robot-07", ".ep"),
        "lost+found": ("lost+found", "ep"),
        "control": ("robot-07", "bad\x01"),
        "not utf-8": ("robot-07", os.fsdecode(b"x\xff")),
        "host": (os.fsdecode(b"h\xff"), "ep"),
    }
    paths = {case: receiver.tarball(host, ep, gnu=True) for case, (host, ep) in names.items()}
    good = receiver.tarball("robot-07", "good", gnu=True)
    result = receiver.run()
    assert result.returncode == 0 and receiver.keys() == [("robot-07", "good")]  # the pass skipped the rest
    logged = sorted(e["reason"] for e in result.named("store_entry_skipped"))
    assert logged == ["unsafe episode name", "unsafe episode name", "unsafe host name"]

    for case, path in paths.items():
        proc = check(receiver, "--json", str(path))
        (answer,) = answers(proc)
        assert answer["verdict"] == "intact" and answer["under_episodes_root"], case
        assert (answer["row"], answer["pass_would_append"], answer["index"]) == (None, False, None), case
        assert proc.returncode == 3, (case, proc.stderr)
        text = check(receiver, str(path)).stdout
        assert "a pass would append" not in text and "a pass skips this file" in text, (case, text)
    reasons = {case: answers(check(receiver, "--json", str(p)))[0]["pass_skips"] for case, p in paths.items()}
    assert [reasons[c] for c in ("control", "not utf-8", "host")] == [
        "unsafe episode name",
        "unsafe episode name",
        "unsafe host name",
    ]
    assert reasons["dot"] and reasons["lost+found"] and "lost+found" in reasons["lost+found"]
    proc = check(receiver, "--json", str(good), str(paths["dot"]))
    assert [a["pass_skips"] for a in answers(proc)] == [None, reasons["dot"]] and proc.returncode == 3


def test_a_bare_name_in_a_host_directory_is_a_store_file(receiver: Receiver) -> None:
    """`cd episodes/robot-07 && check ep.tar.zst`: the file is in the store,
    so it is looked up. Its parent has no name as given ("."): it was taken
    for a file outside the store, of host_id "", and a row with "host_id": ""
    offered."""
    receiver.tarball("robot-07", "ep", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "ep"))
    argv = receiver.argv("--json", "ep.tar.zst", command="check", min_age=0)

    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=receiver.episodes / "robot-07"
    )

    (answer,) = answers(proc)
    assert (answer["path"], answer["host_id"], answer["under_episodes_root"]) == (
        "ep.tar.zst",
        "robot-07",
        True,
    )
    assert answer["index"] == {"found": "matches", "offset": 0, "differences": {}}
    assert proc.returncode == 0, proc.stdout


def test_a_host_directory_reached_through_a_symlink_outside_the_store_is_the_store_s(
    receiver: Receiver, tmp_path: Path
) -> None:
    """An operator's shortcut, ~/robot-07 -> <episodes_root>/robot-07: the
    file named through it is the store's robot-07/ep, looked up as such. It
    was taken for a file outside the store, with the symlink's name for its
    host_id. A symlinked host directory inside the store is still refused."""
    receiver.tarball("robot-07", "ep", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "ep"))
    shortcut = tmp_path / "shortcut"
    shortcut.symlink_to(receiver.episodes / "robot-07")
    inside = receiver.episodes / "robot-08"
    inside.symlink_to(receiver.episodes / "robot-07")

    proc = check(receiver, "--json", str(shortcut / "ep.tar.zst"), str(inside / "ep.tar.zst"))

    through, planted = answers(proc)
    assert (through["host_id"], through["under_episodes_root"], through["verdict"]) == (
        "robot-07",
        True,
        "intact",
    )
    assert through["index"] == {"found": "matches", "offset": 0, "differences": {}}
    assert (planted["verdict"], planted["reason"]) == ("unreadable", "host directory is a symlink")
    assert proc.returncode == 3, proc.stdout


def test_an_indexed_file_it_cannot_read_is_not_said_to_match(receiver: Receiver) -> None:
    """A store file this user may not open: nothing was read, so nothing was
    compared with its row. It was said to match it (no field differed)."""
    path = receiver.tarball("robot-07", "ep", gnu=True)
    receiver.append_row(receiver.receiver_row("robot-07", "ep"))
    path.chmod(0)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = permissions_apply(receiver.argv(*args, str(path), command="check", min_age=0))
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    proc = run("--json")

    (answer,) = answers(proc)
    assert (answer["verdict"], answer["reason"]) == ("unreadable", "open: Permission denied")
    assert answer["index"] == {"found": "not compared", "offset": 0, "differences": {}}
    assert proc.returncode == 3
    text = run().stdout
    assert "indexed (row at byte 0), not compared" in text and "matches" not in text


def test_an_indexed_file_rewritten_while_read_is_unsettled_not_differing(receiver: Receiver) -> None:
    """A receiver that writes in place rewrites an indexed tarball (the same
    bytes, a re-send) while check reads it: the bytes read are no one
    version of the file, so they are not compared with its row. They were:
    "differs" (the size read short), and exit 1 as if it were damaged."""
    path = receiver.episodes / "robot-07" / "ep.tar.zst"
    path.parent.mkdir()
    data = gnu_tarball(path, {"ep/noise.bin": os.urandom(4 << 20)})  # read 1 MiB at a time: 4 s at 1M/s
    receiver.append_row(receiver.receiver_row("robot-07", "ep"))
    proc = subprocess.Popen(
        receiver.argv("--json", "--max-read-rate", "1M", str(path), command="check", min_age=0),
        stdout=subprocess.PIPE,
        text=True,
    )
    fds = Path(f"/proc/{proc.pid}/fd")
    deadline = time.monotonic() + 30
    while str(path) not in {os.path.realpath(fd) for fd in fds.iterdir()} and time.monotonic() < deadline:
        time.sleep(0.01)  # until check holds the file open: its size is taken
    time.sleep(0.2)
    os.truncate(path, 0)  # rewritten in place: opened with O_TRUNC ...
    out, _ = proc.communicate(timeout=60)
    path.write_bytes(data)  # ... and written again

    (answer,) = [json.loads(line) for line in out.splitlines()]
    assert answer["verdict"] == "unsettled", answer
    assert answer["index"] == {"found": "not compared", "offset": 0, "differences": {}}
    assert proc.returncode == 3


@pytest.mark.parametrize("kind", ["unreadable", "directory"])
def test_an_index_it_cannot_read_is_one_line_not_a_traceback(receiver: Receiver, kind: str) -> None:
    """As status says it: one line on stderr naming the index, exit 1
    (not an internal_error traceback, which says "a bug")."""
    path = receiver.tarball("robot-07", "real", gnu=True)
    if kind == "unreadable":  # mode 000, with root's DAC override dropped
        receiver.index.write_bytes(b"")
        receiver.index.chmod(0)
    else:  # a directory made in its place (open(O_RDONLY) succeeds)
        receiver.index.mkdir()
    argv = permissions_apply(receiver.argv(str(path), command="check"))

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=receiver.root)

    assert "internal_error" not in proc.stdout, proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr
    strerror = os.strerror(13) if kind == "unreadable" else "not a regular file"
    assert proc.stderr == f"cis490-reconcile check: error: {receiver.index}: {strerror}\n", proc.stderr


def test_exit_statuses_for_several_files_and_usage_errors(receiver: Receiver) -> None:
    good = receiver.tarball("robot-07", "good", gnu=True)
    cut = receiver.episodes / "robot-07" / "cut.tar.zst"
    make("cut", cut, Path())
    link = receiver.episodes / "robot-07" / "link.tar.zst"
    link.symlink_to(good)

    assert check(receiver, str(good)).returncode == 0
    assert check(receiver, str(good), str(link)).returncode == 3
    assert check(receiver, str(link), str(cut), str(good)).returncode == 1  # damaged wins

    for argv in ([str(receiver.index)], []):
        proc = check(receiver, *argv)
        assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    bad = check(receiver, "--max-window", "1K", str(good))
    assert bad.returncode == 2 and "--max-window '1K'" in bad.stderr


def test_a_check_stopped_after_a_damaged_file_still_exits_1(receiver: Receiver) -> None:
    """SIGTERM while the second file is read, the first one already found
    corrupt (and printed): damaged wins, as without the stop. The stop used
    to exit 3, "nothing damaged", to a script that reads the status."""
    cut = receiver.episodes / "robot-07" / "cut.tar.zst"
    make("cut", cut, Path())
    big = receiver.episodes / "robot-07" / "big.tar.zst"
    gnu_tarball(big, {"ep/noise.bin": os.urandom(4 << 20)})  # 4 s at 1M/s
    argv = receiver.argv("--max-read-rate", "1M", str(cut), str(big), command="check", min_age=0)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first answer, printed before the second read
    assert first.startswith(f"{cut}: corrupt"), first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)

    assert err == "cis490-reconcile check: stopped by SIGTERM\n"
    assert proc.returncode == 1


def test_max_read_rate_paces_the_read(receiver: Receiver) -> None:
    path = receiver.episodes / "robot-07" / "noisy.tar.zst"
    path.parent.mkdir()
    gnu_tarball(path, {"ep/noise.bin": os.urandom(256 << 10)})  # incompressible: about 256 KiB on disk
    seconds = path.stat().st_size / (64 << 10)

    started = time.monotonic()
    proc = check(receiver, "--max-read-rate", "64K", str(path))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - started >= seconds - 1.5  # a token bucket that starts empty, 1 s of burst


def test_memory_stays_bounded_whatever_the_size(receiver: Receiver, tmp_path: Path) -> None:
    path = receiver.episodes / "robot-07" / "big.tar.zst"
    path.parent.mkdir()
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    with (src / "big" / "frames.bin").open("wb") as out:
        subprocess.run(["head", "-c", "192M", "/dev/urandom"], stdout=out, check=True)
    tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(src), "big"], stdout=subprocess.PIPE)
    subprocess.run(["zstd", "-q", "-1", "-o", str(path)], stdin=tar.stdout, check=True)
    assert tar.wait() == 0

    result, peak, _ = measure_rss(["check", "--json", "--episodes-root", str(receiver.episodes), str(path)])

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.events[0]["verdict"] == "intact" and result.events[0]["size_bytes"] > 192 << 20
    assert peak < 96 << 20, peak >> 20
