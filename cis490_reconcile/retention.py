"""Retention: a row older than `retention` whose tarball is gone was pruned
on purpose, not lost. The one rule for which rows are older, used alike by a
pass (its orphan counts), status and scrub. Imports nothing of the package."""

from __future__ import annotations


def cutoff(retention: float | None, now: float) -> float | None:
    """Rows received before this are past the retention; None: no retention."""
    return None if retention is None else now - retention


def older(received: int | None, cutoff: float | None) -> bool:
    """Received before the cutoff. A row of unknown time never is: without a
    received_at_wall it cannot be told from a missing one, so it counts as
    missing. (The state's SQL applies the same rule: state.keys.host_rows.)"""
    return cutoff is not None and received is not None and received < cutoff
