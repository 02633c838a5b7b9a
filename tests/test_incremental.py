"""Incremental passes: what the state lets a pass skip, and proof that it
never changes the outcome."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import Receiver, parse_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis490_reconcile import config, state
from cis490_reconcile.log import make_logger
from cis490_reconcile.reconcile import PassSummary, Reconciler
from cis490_reconcile.store import HostDir


class Run:
    """In-process passes with a captured log, as a fresh process would run them."""

    def __init__(self, receiver: Receiver, state_dir: Path | None, **settings_: object) -> None:
        values = {"episodes_root": receiver.episodes, "index": receiver.index, "min_age": 0, "workers": 1}
        self.cfg = config.build({**values, "state_dir": state_dir or "", **settings_})
        self.log = io.StringIO()
        self.reconciler = Reconciler(self.cfg, make_logger("debug", self.log), rows_out=io.StringIO())

    def once(self) -> PassSummary:
        return self.reconciler.run_pass()

    def events(self, name: str) -> list[dict]:
        return [e for e in parse_events(self.log.getvalue()) if e["event"] == name]


@pytest.fixture
def no_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember directories however recently they changed. Only safe when a
    scheduler tick passes between a listing and the next change (ext4 stamps
    times with a clock that ticks every few ms): tests using this sleep."""
    monkeypatch.setattr(state, "GUARD_NS", 0)


def tick() -> None:
    time.sleep(0.02)


def test_a_second_process_skips_unchanged_directories(receiver: Receiver, tmp_path: Path) -> None:
    """End to end, with the real guard: directories older than it are not listed again."""
    for host in ("h1", "h2", "h3"):
        for i in range(5):
            receiver.tarball(host, f"e{i}")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    time.sleep(state.GUARD_NS / 1e9 + 0.2)
    first = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (first["full"], first["hosts_listed"], first["backfilled"]) == (True, 3, 15)
    assert (state_dir / state.FILE_NAME).stat().st_size > 15 * 16

    second = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (second["full"], second["hosts_listed"], second["hosts_unchanged"]) == (False, 0, 3)
    assert (second["scanned"], second["backfilled"]) == (0, 0)

    receiver.tarball("h2", "new")  # h2 changes; its row is missing
    third = receiver.run("--state-dir", str(state_dir)).one("pass_finished")
    assert (third["hosts_listed"], third["hosts_unchanged"], third["backfilled"]) == (1, 2, 1)
    assert ("h2", "new") in set(receiver.keys())

    forced = receiver.run("--state-dir", str(state_dir), "--full").one("pass_finished")
    assert (forced["full"], forced["hosts_listed"], forced["scanned"], forced["backfilled"]) == (
        True,
        3,
        16,
        0,
    )


def test_the_guard_lists_a_directory_that_changed_within_its_timestamp_tick(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem with 1 s timestamps a file added right after a listing
    leaves the directory's mtime unchanged. Simulate one: the pass sees
    timestamps rounded down to the second."""
    real_stat = HostDir.stat

    def coarse(self: HostDir) -> os.stat_result:
        st = real_stat(self)
        fields = list(st)
        seconds = int(st.st_mtime)
        fields[8] = fields[9] = seconds  # st_mtime, st_ctime (int views)
        return os.stat_result(
            (*fields[:10],), {"st_mtime_ns": seconds * 10**9, "st_ctime_ns": seconds * 10**9}
        )

    monkeypatch.setattr(HostDir, "stat", coarse)
    receiver.tarball("h1", "a")
    run = Run(receiver, tmp_path)
    run.once()
    receiver.tarball("h1", "b")  # same second, most likely; at worst a new mtime
    assert run.once().backfilled == 1
    assert sorted(receiver.keys()) == [("h1", "a"), ("h1", "b")]


def test_a_file_left_in_flight_is_revisited(receiver: Receiver, tmp_path: Path, no_guard: None) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "young")
    run = Run(receiver, tmp_path, min_age=3600)
    first = run.once()
    assert (first.in_flight, first.backfilled) == (2, 0)
    tick()
    run.reconciler.cfg = replace(run.cfg, min_age=0)  # time passes: both settle
    second = run.once()
    assert (second.hosts_unchanged, second.hosts_listed, second.backfilled) == (1, 0, 2)


def test_a_new_process_resumes_the_index_where_the_last_stopped(
    receiver: Receiver, tmp_path: Path, no_guard: None
) -> None:
    receiver.tarball("h1", "a")
    Run(receiver, tmp_path).once()
    for i in range(3):  # the receiver appends rows meanwhile
        receiver.append_row({"host_id": "h9", "episode_id": f"r{i}"})
    receiver.append_raw(b"garbage\n")
    tick()
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert not summary.full and summary.hosts_unchanged == 1
    assert [e["line"] for e in run.events("index_bad_line")] == [5]  # only the new bytes were parsed
    assert summary.bad_index_lines == 1


@pytest.mark.parametrize("how", ["replaced", "truncated", "rewritten"])
def test_a_changed_index_forces_a_full_parse(
    receiver: Receiver, tmp_path: Path, no_guard: None, how: str
) -> None:
    for name in ("a", "b", "c"):
        receiver.tarball("h1", name)
    Run(receiver, tmp_path).once()
    rows = receiver.index.read_bytes().splitlines(keepends=True)
    assert len(rows) == 3
    if how == "replaced":  # a new file at the path, without the last row
        new = receiver.index.with_name("index.new")
        new.write_bytes(b"".join(rows[:2]))
        os.replace(new, receiver.index)
    elif how == "truncated":
        os.truncate(receiver.index, len(rows[0]) + len(rows[1]))
    else:  # same inode, same length, different rows: someone edited it in place
        edited = rows[2].replace(b'"episode_id": "c"', b'"episode_id": "x"')
        with open(receiver.index, "r+b") as f:
            f.seek(len(rows[0]) + len(rows[1]))
            f.write(edited)
    tick()
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert summary.backfilled == 1, "the missing row was not found again"
    assert sorted(k for k in set(receiver.keys()) if k[1] != "x") == [("h1", "a"), ("h1", "b"), ("h1", "c")]
    assert run.events("state_ignored") or run.events("index_restarted")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-5],
        lambda data: b"nonsense",
        lambda data: data[:40] + bytes([data[40] ^ 1]) + data[41:],
        lambda data: data.replace(
            state.MAGIC + state.VERSION.to_bytes(8, "little"),
            state.MAGIC + (state.VERSION - 1).to_bytes(8, "little"),
        ),
    ],
    ids=["truncated", "garbage", "bit-flip", "older-version"],
)
def test_a_bad_state_file_is_ignored_and_rebuilt(receiver: Receiver, tmp_path: Path, damage: object) -> None:
    receiver.tarball("h1", "a")
    Run(receiver, tmp_path).once()
    path = tmp_path / state.FILE_NAME
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    receiver.tarball("h1", "b")
    run = Run(receiver, tmp_path)
    summary = run.once()
    assert run.events("state_ignored")
    assert summary.full and summary.backfilled == 1
    assert state.decode(path.read_bytes()).index_lines == 2  # rewritten, valid


def test_loop_mode_keeps_its_memory_between_passes(receiver: Receiver, no_guard: None) -> None:
    receiver.tarball("h1", "a")
    run = Run(receiver, None)  # no state directory: memory only
    run.once()
    tick()
    again = run.once()
    assert (again.full, again.hosts_unchanged, again.scanned) == (False, 1, 0)


# --- the property: incremental == full -----------------------------------------------

HOSTS = ["h0", "h1", "h2"]
step = st.one_of(
    st.tuples(st.just("tarball"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("receiver_row"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("corrupt"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("remove"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("torn"), st.sampled_from(HOSTS), st.integers(0, 5)),
    st.tuples(st.just("pass"), st.booleans(), st.just(0)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(step, max_size=14))
def test_incremental_passes_end_where_full_passes_end(
    tmp_path_factory: pytest.TempPathFactory, history: list[tuple[str, object, int]]
) -> None:
    """Play a random store history against two twins: one reconciled by
    incremental passes (state on disk, a new process at every other pass),
    one by full passes only. After a final pass both indexes hold the same rows."""
    saved, state.GUARD_NS = state.GUARD_NS, 0
    try:
        root = tmp_path_factory.mktemp("history")
        twins = [Receiver(root / "inc"), Receiver(root / "full")] if _mkdirs(root) else []
        inc, full = twins
        state_dir = root / "state"
        state_dir.mkdir()
        keep = Run(inc, state_dir)
        for what, host, n in history:
            for r in twins:
                _apply(r, what, host, n)
            if what == "pass":
                keep = Run(inc, state_dir) if host else keep  # host: a fresh process this time
                keep.once()
                Run(full, None, full_every=0).reconciler.run_pass()
            tick()
        Run(inc, state_dir).once()
        fresh = Run(full, None)
        fresh.reconciler.force_full = True
        fresh.once()
        assert _rows(inc) == _rows(full)
        assert sorted(set(_rows(inc))) == _rows(inc), "a duplicate row"
    finally:
        state.GUARD_NS = saved


def _mkdirs(root: Path) -> bool:
    for name in ("inc", "full"):
        (root / name).mkdir()
    return True


def _apply(r: Receiver, what: str, host: object, n: int) -> None:
    """One event of a store's life. The receiver appends a row for a tarball
    that has none (a late row; the in-flight guard is not what is tested)."""
    episode_id = f"e{n}"
    path = r.episodes / str(host) / f"{episode_id}.tar.zst"
    if what == "tarball" and not path.exists():
        r.tarball(str(host), episode_id, {"meta.json": b"{}", "data": episode_id.encode() * 10})
    elif what == "corrupt" and not path.exists():
        r.tarball(str(host), episode_id, blob=b"\x28\xb5\x2f\xfd" + b"\x00" * 7)
    elif what == "remove" and path.exists():
        path.unlink()
    elif what == "receiver_row" and path.exists() and (host, episode_id) not in _rows(r):
        row = {"host_id": host, "episode_id": episode_id, "size_bytes": path.stat().st_size}
        r.append_row(row)
    elif what == "torn" and path.exists() and (host, episode_id) not in _rows(r):  # a row without its "\n"
        r.append_raw(json.dumps({"host_id": host, "episode_id": episode_id}, sort_keys=True).encode())


def _rows(r: Receiver) -> list[tuple[str, str]]:
    if not r.index.exists():
        return []
    keys = []
    for line in r.index.read_bytes().splitlines():
        with contextlib.suppress(ValueError):  # two torn rows glued by the simulated receiver
            row = json.loads(line)
            keys.append((row["host_id"], row["episode_id"]))
    return sorted(keys)
