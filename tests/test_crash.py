"""kill -9 at random moments of a pass, many times over the same store: the
index never holds a duplicate or a glued row, at worst one torn last line,
and a final clean pass leaves exactly one row per tarball."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter

from helpers import Receiver, episode

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
    final = receiver.run("--workers", "1")
    assert final.returncode == 0
    keys = check_index(receiver)
    assert sorted(keys) == sorted(made)
    assert receiver.index.read_bytes().endswith(b"\n")
    print(f"{TRIALS} trials: {dict(outcomes)}")
    assert outcomes["finished"] < TRIALS * 0.9, "the kills missed the passes"


def _phase(returncode: int, log: str) -> str:
    """Where the kill landed, from what the pass had logged."""
    if returncode == 0:
        return "finished"
    if "index_appended" in log:
        return "killed after its commit"
    if "pass_started" in log:
        return "killed in the pass, before its commit"
    return "killed while starting"
