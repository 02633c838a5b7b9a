"""Property tests: whatever the index holds and however a tarball is damaged,
a pass never crashes, never indexes a damaged tarball, never changes an
existing byte of the index, and appends exactly the missing rows."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import sqlite3
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import Receiver, episode, parse_events, tar_bytes, verdict_of, zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis490_reconcile import config, scrub, zstdframe
from cis490_reconcile.log import make_logger
from cis490_reconcile.notify import Notifier
from cis490_reconcile.reconcile import Reconciler
from cis490_reconcile.scrub import Scrubber, ScrubRun
from cis490_reconcile.scrubcursor import PrunedRuns
from cis490_reconcile.state import Records
from cis490_reconcile.verify import Corrupt, Intact, Unverifiable

STORE = [("h1", "a"), ("h1", "b"), ("h1", "c"), ("h2", "a"), ("h2", "d"), ("h2", "e")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Receiver:
    receiver = Receiver(tmp_path_factory.mktemp("store"))
    for host, episode_id in STORE:
        receiver.tarball(host, episode_id, episode(os.urandom(500)))
    return receiver


def row(host: str | None, episode_id: str) -> bytes:
    obj = {"episode_id": episode_id, "sha256": "0" * 64}
    if host is not None:
        obj["host_id"] = host
    return json.dumps(obj, sort_keys=True).encode()


keys = st.sampled_from([*STORE, ("h9", "zz"), (None, "a"), (None, "e"), (None, "nowhere")])
junk = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
line = st.one_of(
    keys.map(lambda k: row(*k)),
    junk,
    st.just(b""),
    st.just(b"   "),
    st.sampled_from(
        [b'{"episode_id": 7}', b'{"episode_id": "a", "host_id": ["h1"]}', b"[1, 2]", b'"a"', b"null", b"{"]
    ),
)


def covers(raw: bytes) -> tuple[str | None, str] | None:
    """The test's own reading of the coverage rule (README: the store and the row contract)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("episode_id"), str) or not obj["episode_id"]:
        return None
    host = obj.get("host_id")
    return (host, obj["episode_id"]) if host is None or isinstance(host, str) else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=12), torn=st.booleans())
def test_any_index_contents(store: Receiver, lines: list[bytes], torn: bool) -> None:
    original = b"\n".join(lines) + (b"" if torn or not lines else b"\n")
    with tempfile.TemporaryDirectory() as d:
        index = Path(d, "index.jsonl")
        index.write_bytes(original)
        cfg = config.build(
            {"episodes_root": store.episodes, "index": index, "min_age": 0, "workers": 1, "state_dir": ""}
        )
        with Reconciler(cfg, make_logger("error", io.StringIO())) as reconciler:
            summary = reconciler.run_pass()
        after = index.read_bytes()
    assert after.startswith(original)  # not one existing byte changed
    added = after[len(original) :]
    if original and not original.endswith(b"\n") and added:
        assert added.startswith(b"\n")  # the torn tail was terminated, not glued onto
        added = added[1:]
    covered = {k for k in map(covers, original.split(b"\n")) if k}
    missing = [(h, e) for h, e in STORE if (h, e) not in covered and (None, e) not in covered]
    appended = [json.loads(raw) for raw in added.splitlines()]
    assert sorted((r["host_id"], r["episode_id"]) for r in appended) == sorted(missing)
    assert summary.backfilled == len(missing)


CONTENT = tar_bytes(episode(os.urandom(3000)))
ORIGINAL = zstd(CONTENT, checksum=True)
damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(ORIGINAL) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(ORIGINAL) - 1), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, len(ORIGINAL) - 1), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, len(ORIGINAL)), st.integers(0, 255)),
)


def apply(data: bytes, how: tuple[str, int, int]) -> bytes:
    what, at, n = how
    at = min(at, len(data) - 1) if what != "insert" else min(at, len(data))
    if what == "flip":
        return data[:at] + bytes([data[at] ^ n]) + data[at + 1 :]
    if what == "cut":
        return data[:at]
    if what == "delete":
        return data[:at] + data[at + n :]
    return data[:at] + bytes([n]) + data[at:]


@settings(max_examples=400, deadline=None)
@given(damages=st.lists(damage, min_size=1, max_size=3))
def test_damaged_tarballs_are_never_intact(damages: list[tuple[str, int, int]]) -> None:
    """Damage is corrupt or unverifiable, unless it changed nothing zstd
    reads: some bits of a compressed block are never read, and some tables
    have more than one encoding. In 20 random ORIGINALs, 261 of the single
    bit flips in the last 120 bytes decoded to the very same tar, checksum
    and all. Such a file is a whole tarball; its row gets its own sha256."""
    data = ORIGINAL
    for how in damages:
        data = apply(data, how) if data else data  # an empty file stays empty
    if data == ORIGINAL:
        return
    verdict = verdict_of(data)
    if isinstance(verdict, Intact):
        assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == CONTENT, verdict
        assert verdict.sha256 == hashlib.sha256(data).hexdigest()
        return
    assert isinstance(verdict, (Corrupt, Unverifiable)), verdict
    if isinstance(verdict, Unverifiable):  # only what a frame header declares, never a broken structure
        assert "zstd frame" in verdict.reason
        walker = zstdframe.FrameWalker()
        walker.feed(data)
        assert walker.problem(len(data)) is None


# frames with and without a checksum and a skippable frame between: every kind of header to split
FRAMES = zstd(CONTENT[:2000], checksum=False) + b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc" + ORIGINAL


@settings(max_examples=300, deadline=None)
@given(
    damages=st.lists(damage, max_size=2),
    reads=st.lists(st.one_of(st.integers(1, 3), st.integers(1, 3000)), max_size=40),  # header bits, or more
)
def test_the_frame_walker_says_the_same_however_reads_split_the_bytes(
    damages: list[tuple[str, int, int]], reads: list[int]
) -> None:
    """A read of a large file ends anywhere, inside a frame or block header
    too; the walker's verdict must not depend on where (bytes or bytearray)."""
    data = FRAMES
    for how in damages:
        data = apply(data, how) if data else data
    whole, split = zstdframe.FrameWalker(), zstdframe.FrameWalker()
    whole.feed(data)
    bounds = sorted({0, len(data), *(min(end, len(data)) for end in itertools.accumulate(reads))})
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        split.feed(data[start:end] if i % 2 else bytearray(data[start:end]))

    def said(w: zstdframe.FrameWalker) -> tuple[object, ...]:
        return w.problem(len(data)), w.frames, w.unchecksummed_frames, w.max_window, w.refusal

    assert said(split) == said(whole)
    if not damages:
        assert said(whole) == (None, 2, 1, whole.max_window, None)


# --- scrub: runs found pruned are counted exactly as reading them would ------------------

KINDS = ("kept", "old", "young", "bad")  # a tarball there; gone, received 2 days ago; gone, 1 hour ago; junk
NOW = time.time()
# a stretch of lines of one kind: long stretches make runs, short ones break them
stretch = st.tuples(st.sampled_from(KINDS), st.integers(1, 6)).map(lambda t: [t[0]] * t[1])
appended = st.lists(stretch, min_size=1, max_size=6).map(lambda s: [k for part in s for k in part])
stop_after = st.one_of(st.none(), st.integers(1, 30))  # checkpoints before a stop request
scrub_step = st.tuples(stop_after, st.sampled_from(["1d", "3d"]))  # a scrub run, and its retention
step = st.one_of(scrub_step, appended)  # or lines appended


def index_line(receiver: Receiver, kind: str, n: int) -> bytes:
    if kind == "bad":
        return b"not json"
    if kind == "kept":
        receiver.tarball("h1", f"k{n}", blob=os.urandom(64))
        return json.dumps(receiver.receiver_row("h1", f"k{n}"), sort_keys=True).encode()
    stamp = NOW - (2 * 86400 if kind == "old" else 3600)
    wall = datetime.fromtimestamp(stamp, timezone.utc).isoformat()
    row = {
        "host_id": "h1",
        "episode_id": f"g{n}",
        "received_at_wall": wall,
        "sha256": "0" * 64,
        "size_bytes": 9,
    }
    return json.dumps(row, sort_keys=True).encode()


def expected(kinds: list[str], retention: str) -> dict[str, int]:
    """The scrub counts of these lines read one by one: the model."""
    old = kinds.count("old")
    young = kinds.count("young")
    pruned, missing = (old, young) if retention == "1d" else (0, young + old)  # 2 days ago: before 1d
    count = {"ok": kinds.count("kept"), "pruned": pruned, "missing": missing, "bad_lines": kinds.count("bad")}
    return {**count, "checked": count["ok"] + pruned + missing}


def scrub_events(
    receiver: Receiver, state: Path, retention: str, stop: int | None
) -> tuple[Scrubber, ScrubRun, list[dict]]:
    """One scrub run in this process, asked to stop after `stop`
    checkpoints: the Scrubber (its cursor where it stopped, saved or not),
    what it did, and every event."""
    cfg = config.build(
        {
            "episodes_root": str(receiver.episodes),
            "index": str(receiver.index),
            "state_dir": str(state),
            "retention": retention,
        }
    )
    checks = itertools.count(1)
    should_stop = (lambda: False) if stop is None else (lambda: next(checks) > stop)
    out = io.StringIO()
    scrubber = Scrubber(cfg, make_logger("info", out), Notifier({}), should_stop, None, None)
    done = scrubber.run()
    return scrubber, done, parse_events(out.getvalue())


def scrub_once(receiver: Receiver, state: Path, retention: str, stop: int | None) -> tuple[ScrubRun, dict]:
    """One scrub run in this process, asked to stop after `stop`
    checkpoints; what it did, and its scrub_finished event."""
    _, done, events = scrub_events(receiver, state, retention, stop)
    (finished,) = [e for e in events if e["event"] == "scrub_finished"]
    return done, finished


def saved_offset(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state / "state.sqlite3")) as db:
        (value,) = db.execute("SELECT value FROM records WHERE name = 'scrub_cursor'").fetchone()
    return int(json.loads(value)["offset"])


@settings(max_examples=60, deadline=None)
@given(first=appended, steps=st.lists(step, max_size=8))
def test_scrub_counts_with_pruned_runs_equal_reading_every_row(
    first: list[str], steps: list[list[str] | tuple[int | None, str]]
) -> None:
    """Random indexes, appends, stops anywhere and retention moving both
    ways, with runs of 2 rows and pages of 2 runs (PrunedRuns' real sizes
    need thousands of rows): every scrub run counts exactly the lines it
    passed, as reading each of them would. Then, from a fresh state, one
    round finds every stretch of pruned rows and the next counts all of
    them unread."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(PrunedRuns, "MIN_ROWS", 2)
        mp.setattr(PrunedRuns, "PAGE", 2)
        receiver = Receiver(Path(tmp))
        (receiver.episodes / "h1").mkdir()
        state = Path(tmp) / "state"
        state.mkdir()
        kinds: list[str] = []
        ends: list[int] = []  # each line's end offset

        def append(lines: list[str]) -> None:
            for kind in lines:
                receiver.append_raw(index_line(receiver, kind, len(kinds)) + b"\n")
                kinds.append(kind)
                ends.append(receiver.index.stat().st_size)

        append(first)
        offset = 0
        for what in [*steps, (None, "1d")]:
            if isinstance(what, list):
                append(what)
                continue
            stop, retention = what
            done, _ = scrub_once(receiver, state, retention, stop)
            end = ends[-1] if done.round_completed else saved_offset(state)
            passed = [k for k, e in zip(kinds, ends, strict=True) if offset < e <= end]
            assert {k: getattr(done.run, k) for k in expected(passed, "1d")} == expected(passed, retention)
            offset = 0 if done.round_completed else end

        fresh = Path(tmp) / "fresh"
        fresh.mkdir()
        first_round, read = scrub_once(receiver, fresh, "1d", None)
        second_round, counted = scrub_once(receiver, fresh, "1d", None)
        stretches = [len(list(g)) for kind, g in itertools.groupby(kinds) if kind == "old"]
        assert first_round.run == second_round.run
        assert (read["pruned_unread"], counted["pruned_unread"]) == (0, sum(n for n in stretches if n >= 2))


# the same inode rewritten in place: a byte before the first line, the first line gone, the last one gone
rewrite = st.sampled_from(["shift", "unshift", "cut"])
failing_saves = st.frozensets(st.integers(1, 8), max_size=3)  # which saves of a scrub run fail (busy)
scrub_or_fail = st.tuples(stop_after, st.sampled_from(["1d", "3d"]), failing_saves)
history = st.one_of(scrub_or_fail, scrub_or_fail, appended, rewrite)  # scrubs: half the steps
COUNTS = tuple(expected([], "1d"))


@settings(max_examples=100, deadline=None)
@given(first=appended, steps=st.lists(history, min_size=2, max_size=12))
def test_scrub_counts_stay_exact_when_saves_fail_and_the_index_is_rewritten_in_place(
    first: list[str], steps: list[list[str] | str | tuple[int | None, str, frozenset[int]]]
) -> None:
    """As above, with a save every 3 rows of which some fail (the cursor and
    the runs rolled back together: the next run resumes from the last save),
    and the index rewritten in place (same inode), so that runs saved before
    may start or end inside a line, or past the end. Every run counts exactly
    the lines from where it resumed to where it stopped, both line starts (a
    read cut inside a line would take it for a torn tail and end the round);
    a round's counts are each of its lines as last counted."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(PrunedRuns, "MIN_ROWS", 2)
        mp.setattr(PrunedRuns, "PAGE", 2)
        mp.setattr(scrub, "SAVE_EVERY_ROWS", 3)
        receiver = Receiver(Path(tmp))
        (receiver.episodes / "h1").mkdir()
        receiver.index.touch()
        ino = receiver.index.stat().st_ino
        state = Path(tmp) / "state"
        state.mkdir()
        names = itertools.count()
        lines: list[tuple[str, bytes]] = []  # each line's kind and bytes, "\n" included
        counted: dict[int, list[str | None]] = {}  # by round: the retention each line was last counted under
        dirty: set[int] = set()  # rounds begun before a rewrite: their lines moved under them
        fails: frozenset[int] = frozenset()
        saves = itertools.count(1)
        real_save = Records.save_pruned_runs

        def save(self: Records, *args: Any) -> None:
            if next(saves) in fails:
                raise sqlite3.OperationalError("database is locked")
            real_save(self, *args)

        mp.setattr(Records, "save_pruned_runs", save)
        for what in [first, *steps, (None, "1d", frozenset())]:
            if isinstance(what, tuple):
                stop, retention, fails = what
                saves = itertools.count(1)
                scrubber, done, events = scrub_events(receiver, state, retention, stop)
                assert receiver.index.stat().st_ino == ino
                ends = list(itertools.accumulate(len(raw) for _, raw in lines))
                (started,) = [e for e in events if e["event"] == "scrub_started"]
                resumed, round_ = started["offset"], started["round"]
                end = (ends or [0])[-1] if done.round_completed else scrubber.cursor.offset
                assert resumed in (0, *ends) and end in (0, *ends)
                passed = [i for i, e in enumerate(ends) if resumed < e <= end]
                run = {k: getattr(done.run, k) for k in COUNTS}
                assert run == expected([lines[i][0] for i in passed], retention)
                if resumed == 0:
                    counted[round_] = [None] * len(lines)
                    dirty.discard(round_)
                for i in passed:
                    counted[round_][i] = retention
                if round_ not in dirty:
                    in_round = Counter[str]()
                    for i, e in enumerate(ends):
                        if e <= end:
                            under = counted[round_][i]
                            assert under is not None
                            in_round.update(expected([lines[i][0]], under))
                    assert {k: getattr(done.in_round, k) for k in COUNTS} == {k: in_round[k] for k in COUNTS}
                continue
            if isinstance(what, list):
                lines += [(kind, index_line(receiver, kind, next(names)) + b"\n") for kind in what]
                for under in counted.values():
                    under += [None] * len(what)
            elif lines:
                at = {"shift": 0, "unshift": 0, "cut": -1}[what]
                if what == "shift":
                    lines[at] = (lines[at][0], b" " + lines[at][1])
                else:
                    del lines[at]
                    for under in counted.values():
                        del under[at]
                dirty |= set(counted)
            with open(receiver.index, "r+b") as f:  # in place: the same inode
                f.truncate(0)
                f.write(b"".join(raw for _, raw in lines))

        fresh = Path(tmp) / "fresh"
        fresh.mkdir()
        _, first_round, read = scrub_events(receiver, fresh, "1d", None)
        _, second_round, counted_again = scrub_events(receiver, fresh, "1d", None)
        kinds = [kind for kind, _ in lines]
        stretches = [len(list(g)) for kind, g in itertools.groupby(kinds) if kind == "old"]
        assert first_round.run == second_round.run
        assert first_round.run.checked == expected(kinds, "1d")["checked"]
        unread = [e["pruned_unread"] for e in (*read, *counted_again) if e["event"] == "scrub_finished"]
        assert unread == [0, sum(n for n in stretches if n >= 2)]
