"""Retention: a row older than `retention` whose tarball is gone was pruned
on purpose, not lost. The one rule for which rows are older, used alike by a
pass (its orphan counts), status and scrub. Imports nothing of the package.

The cutoff is a whole hour, the first after now - retention: a row counts as
older from the start of the hour in which it turns `retention` old, up to an
hour early, never late. Whole hours let the state database count a host's
keys by the hour they were received (migrations/0002.sql), so "how many are
older" costs a host's days and hours, not its rows; and a cutoff that errs
early never reports a row missing that a receiver pruned on time.
"""

from __future__ import annotations

import math

HOUR = 3600


def cutoff(retention: float | None, now: float) -> float | None:
    """Rows received before this are past the retention; None: no retention."""
    return None if retention is None else float(math.ceil((now - retention) / HOUR) * HOUR)


def older(received: int | None, cutoff: float | None) -> bool:
    """Received before the cutoff (a time before 1970 counts as 1970). A
    row of unknown time never is: without a received_at_wall it cannot be
    told from a missing one, so it counts as missing. The state's SQL
    applies the same rule (state.keys: received_hours, Keys.rows)."""
    return cutoff is not None and received is not None and max(received, 0) < cutoff
