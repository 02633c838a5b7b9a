"""Prometheus metrics for node_exporter's textfile collector, one file per host.

Written after every pass, whole, through a temp file and a rename, so the
collector never reads half a file (one bad line makes it drop the whole
file). A batch job's key metric is the time of its last success: it is
carried forward unchanged when a pass fails (taken from memory, or from the
file the last process wrote), so "last success too old" is the alert.
Samples carry no timestamps and HELP strings are constants.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import __version__, syscalls

if TYPE_CHECKING:
    from .scrub import Outcome as ScrubOutcome

NS = "cis490_reconcile"
SCRUB_NS = f"{NS}_scrub"
TARBALL_STATES = (
    "scanned",
    "already_indexed",
    "in_flight",
    "corrupt",
    "unverifiable",
    "quarantined",
    "unsettled",
    "unreadable",
    "skipped",
)


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the metrics say about one pass (a failed pass's counts are those
    it reached)."""

    started_at: float  # unix seconds
    duration_s: float
    success: bool
    counts: dict[str, float]  # PassSummary fields by name
    orphan_rows: tuple[int, int] | None  # (missing, pruned) as of the last full pass, None if never known


CARRIED = ("last_success_timestamp_seconds",)


def carried_forward(path: Path) -> dict[str, float]:
    """The values a new process carries forward from the file the last one
    wrote (by CARRIED name), so a failed first pass does not drop them."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(path.read_text()):
            name = family.name.removeprefix(f"{NS}_")
            if name in CARRIED and family.samples:
                found[name] = family.samples[0].value
    except (OSError, ValueError):
        pass
    return found


def _gauges(registry: CollectorRegistry, ns: str) -> Callable[..., Gauge]:
    """gauge(name, doc, value=None, labels=()) registering in `registry`;
    a value None leaves the gauge unset (it is still declared)."""

    def gauge(name: str, doc: str, value: float | None = None, labels: tuple[str, ...] = ()) -> Gauge:
        g = Gauge(f"{ns}_{name}", doc, labels, registry=registry)
        if value is not None and not labels:
            g.set(value)
        return g

    return gauge


def render(facts: RunFacts, last_success: float | None) -> bytes:
    registry = CollectorRegistry()
    gauge = _gauges(registry, NS)
    info = Info(f"{NS}_build", "Version of cis490-reconcile and its Python.", registry=registry)
    info.info({"version": __version__, "python": platform.python_version()})
    gauge("last_run_timestamp_seconds", "When the last pass started (unix time).", facts.started_at)
    gauge(
        "last_success_timestamp_seconds", "When the last successful pass started (unix time).", last_success
    )
    gauge("last_run_duration_seconds", "How long the last pass took.", facts.duration_s)
    gauge("last_run_success", "1 if the last pass completed, 0 if it failed.", 1 if facts.success else 0)
    c = facts.counts
    gauge("last_run_rows_backfilled", "Rows the last pass appended to the index.", c.get("backfilled"))
    gauge("last_run_bytes_read", "Tarball bytes the last pass read.", c.get("bytes_read"))
    gauge("last_run_lock_wait_seconds", "Time the last pass waited for the index lock.", c.get("lock_wait_s"))
    gauge("index_bad_lines", "Lines of index.jsonl that are not rows.", c.get("bad_index_lines"))
    tarballs = gauge("last_run_tarballs", "Tarballs the last pass saw, by what it found.", labels=("state",))
    for state in TARBALL_STATES:
        if state in c:
            tarballs.labels(state=state).set(c[state])
    if facts.orphan_rows is not None:
        orphans = gauge(
            "orphan_rows",
            "Index rows whose tarball is not on disk, as of the last full pass: missing (received within "
            "the retention, or no retention set) or pruned (older).",
            labels=("kind",),
        )
        for kind, value in zip(("missing", "pruned"), facts.orphan_rows, strict=True):
            orphans.labels(kind=kind).set(value)
    return generate_latest(registry)


def write(path: Path, facts: RunFacts, last_success: float | None) -> None:
    syscalls.write_atomic(path, render(facts, last_success))


def render_scrub(o: ScrubOutcome) -> bytes:
    """The scrub's own textfile, so a scrub and a pass never overwrite each
    other's metrics. The round figures are those of the round this run
    worked on, so a just-completed round still shows."""
    from .scrub import RESULTS

    registry = CollectorRegistry()
    gauge = _gauges(registry, SCRUB_NS)
    gauge("last_run_timestamp_seconds", "When the last scrub run started (unix time).", o.started_at)
    gauge("last_run_duration_seconds", "How long the last scrub run took.", o.duration_s)
    gauge("last_run_rows_checked", "Index rows whose tarball the last scrub run checked.", o.run["checked"])
    gauge("last_run_bytes_read", "Tarball bytes the last scrub run read.", o.run["bytes_read"])
    gauge(
        "last_run_rows_unverifiable",
        "Rows the last run could not check (no host_id, digest...).",
        o.run["unverifiable"],
    )
    by_result = gauge("last_run_rows", "Rows the last scrub run checked, by result.", labels=("result",))
    round_rows = gauge(
        "round_rows", "Rows checked in the current (or just completed) round, by result.", labels=("result",)
    )
    for result in RESULTS:
        by_result.labels(result=result).set(o.run[result])
        round_rows.labels(result=result).set(o.in_round[result])
    gauge("round", "Number of the current (or just completed) scrub round.", o.round)
    gauge("round_progress_ratio", "How far through the index the current round is (by bytes).", o.progress)
    if o.last_round_completed_at is not None:
        gauge(
            "last_round_completed_timestamp_seconds",
            "When the last complete round over the index ended (unix time).",
            o.last_round_completed_at,
        )
    return generate_latest(registry)
