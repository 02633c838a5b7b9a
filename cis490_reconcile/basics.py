"""Small helpers every layer uses, importing nothing of the package: how
times and sizes are written, and the named steps the tests can kill or
pause a run at.

Named steps (`step`): the crash tests prove that a kill -9 at each one
leaves an index and a state database the next pass makes whole; the
concurrency tests pause a run at one to start another command beside it.

    index_written   between the index write and its fdatasync
    appended        after an append, before the state database knows
    in_transaction  inside a state transaction while catching up
    forked          a rebuild's forked reader has started
    split_joined    a rebuild's forked reader handed its part over, both unsorted
    sorted          a rebuild's lower hosts are in the new keys, the forked
                    reader's upper hosts sorted, not yet added
    rebuilding      halfway through a full rebuild, its halves merged
    caught_up       a pass has read the index, holding the state directory
    scrubbing       a scrub is at its first row, its state database open

CIS490_TEST_CRASH_AT=NAME kills the process there (SIGKILL);
CIS490_TEST_PAUSE_AT=NAME stops there once, after saying so on stderr,
until its standard input is closed. Neither is set outside the tests.
"""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CRASH_AT = os.environ.get("CIS490_TEST_CRASH_AT")
_PAUSE_AT = os.environ.get("CIS490_TEST_PAUSE_AT")
_paused: set[str] = set()


def step(name: str) -> None:
    """A named step (see above): die or pause here when the tests ask."""
    if name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == _PAUSE_AT and name not in _paused:
        _paused.add(name)
        os.write(2, f"cis490-reconcile: paused at {name}\n".encode())
        os.read(0, 1)  # until the test closes our stdin


def iso_utc(ns: int) -> str:
    """A timestamp the way the receiver writes received_at_wall:
    ``2026-11-25T08:23:02.659399+00:00``."""
    return (_EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# C0, DEL and C1: what a terminal may act on rather than show
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def for_terminal(lines: list[str]) -> str:
    """Lines of text output, each control character shown as \\xNN: an ESC in
    a shipper's file name, a tar member's name or an index row is a string
    to read, not a command to the operator's terminal."""
    return "".join(line.translate(_CONTROLS) + "\n" for line in lines)


def human_duration(seconds: float) -> str:
    """An age as an operator reads it: 45 s, 25 min, 3.2 h, 12.0 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
