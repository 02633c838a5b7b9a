"""Passes back to back against a live receiver (tests/receiver_sim.py) that
stores tarballs and appends rows at a high rate, for each lock family the
receiver might use. Afterwards: every tarball has exactly one row, every
line is one row, and the receiver's own rows are byte-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, Receiver, clean_env, parse_events

pytestmark = pytest.mark.e2e  # also under every other supported Python (.ci/noxfile.py)

SIM = REPO / "tests" / "receiver_sim.py"


def simulate(receiver: Receiver, rows_out: Path, **options: object) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(SIM), str(receiver.episodes), str(receiver.index), str(rows_out)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return subprocess.Popen(argv, env=clean_env(PYTHONPATH=str(REPO)))


def back_to_back(receiver: Receiver, sim: subprocess.Popen[bytes], min_age: float) -> list[dict]:
    """--once passes, one after the other, until the simulator is done."""
    summaries = []
    while sim.poll() is None:
        result = receiver.run(min_age=min_age)
        assert result.returncode == 0, result.stdout + result.stderr
        summaries.append(result.one("pass_finished"))
    return summaries


def check(receiver: Receiver, rows_out: Path, min_age: float) -> Counter[str]:
    """Every line is one row in the contract's encoding; every tarball has a
    row and every row a tarball; the receiver's rows are byte-identical.
    A tarball has exactly one row unless the receiver's came more than
    `min_age` after it last changed (receiver_sim.py measures each; a loaded
    machine holds some back): a pass may then have back-filled it first, and
    it has two. Returns rows by source; a pass's row beside a late receiver
    row counts as "late", not "backfilled"."""
    data = receiver.index.read_bytes()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    keys = Counter()
    for line in lines:
        row = json.loads(line)  # every line parses: nothing glued or torn
        assert line.decode() == json.dumps(row, sort_keys=True)
        keys[(row["host_id"], row["episode_id"])] += 1
    on_disk = {
        (p.parent.name, p.name.removesuffix(".tar.zst")) for p in receiver.episodes.glob("*/*.tar.zst")
    }
    assert set(keys) == on_disk, "a tarball without a row, or a row without a tarball"
    theirs = rows_out.read_bytes().split(b"\n")[:-1]
    assert set(theirs) <= set(lines), "a receiver row was changed"
    lag_lines = Path(f"{rows_out}.lag").read_text().splitlines()
    lags = {(host, episode_id): float(lag) for host, episode_id, lag in map(str.split, lag_lines)}
    late = {key for key, lag in lags.items() if lag > min_age}
    twice = {key for key, n in keys.items() if n > 1}
    assert max(keys.values()) <= 2 and twice <= late, sorted(twice - late)[:5]
    assert len(late) * 2 < len(lags), "most receiver rows came late: this run proved little"
    sources = Counter("backfilled" if b'"backfilled": true' in line else "receiver" for line in lines)
    sources["backfilled"] -= len(twice)
    sources["late"] = len(twice)
    print(f"{len(late)} of {len(lags)} receiver rows over {min_age} s late (max {max(lags.values()):.2f} s)")
    return sources


@pytest.mark.parametrize("family", ["flock", "lockf", "ofd", "ours"])
def test_live_receiver_with_the_in_flight_guard(receiver: Receiver, tmp_path: Path, family: str) -> None:
    """Rows follow their tarball 0.2 s later; the guard (1 s) is longer."""
    rows_out = tmp_path / "receiver-rows"
    sim = simulate(receiver, rows_out, count=1200, rate=400, family=family, mode="rename", delay=0.2)
    passes = back_to_back(receiver, sim, min_age=1)
    assert sim.wait() == 0
    receiver.run(min_age=1)
    sources = check(receiver, rows_out, min_age=1)
    assert sources["receiver"] == 1200 and len(passes) >= 3
    print(f"{family}: {len(passes)} passes, rows {dict(sources)}")


def test_the_guard_against_a_direct_writer_and_a_lost_row(receiver: Receiver, tmp_path: Path) -> None:
    """Tarballs written in place in chunks; plus gaps the receiver never fills
    (made before it starts), which the passes must backfill exactly once."""
    for i in range(30):
        receiver.tarball("r9", f"gap{i:02}")
    rows_out = tmp_path / "receiver-rows"
    sim = simulate(receiver, rows_out, count=800, rate=400, family="lockf", mode="direct", delay=0.3)
    back_to_back(receiver, sim, min_age=1)
    assert sim.wait() == 0
    receiver.run(min_age=1)
    sources = check(receiver, rows_out, min_age=1)
    assert (sources["receiver"], sources["backfilled"]) == (800, 30)


def test_min_age_zero_with_a_receiver_that_renames_under_its_lock(receiver: Receiver, tmp_path: Path) -> None:
    """Without a guard, exactly one row still holds when the receiver makes
    the tarball visible and appends its row in one locked section."""
    rows_out = tmp_path / "receiver-rows"
    sim = simulate(receiver, rows_out, count=1200, rate=500, family="ofd", mode="locked-rename")
    back_to_back(receiver, sim, min_age=0)
    assert sim.wait() == 0
    assert check(receiver, rows_out, min_age=0)["receiver"] == 1200


def test_loop_mode_against_a_live_receiver(receiver: Receiver, tmp_path: Path) -> None:
    for i in range(20):
        receiver.tarball("r9", f"gap{i:02}")
    rows_out = tmp_path / "receiver-rows"
    loop = subprocess.Popen(
        receiver.argv("--interval", "0.1", min_age=1), stdout=subprocess.PIPE, text=True, env=clean_env()
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(loop.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    sim = simulate(receiver, rows_out, count=1000, rate=400, family="flock", mode="rename", delay=0.2)
    assert sim.wait() == 0
    time.sleep(2.5)  # let the guard expire and a pass run
    loop.send_signal(signal.SIGTERM)
    assert loop.wait(timeout=10) == 0
    reader.join(timeout=5)
    finished = [e for e in parse_events("".join(out)) if e["event"] == "pass_finished"]
    assert len(finished) >= 5
    sources = check(receiver, rows_out, min_age=1)
    assert (sources["receiver"], sources["backfilled"]) == (1000, 20)
