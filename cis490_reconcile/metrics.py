"""Prometheus metrics for node_exporter's textfile collector.

Every metric is declared once, in PASS and SCRUB: name, help, labels. The
files are rendered from those tables, and so is README's metrics reference
(tests/test_readme.py fails when they differ).

Each file is written whole, through a temp file and a rename
(syscalls.write_atomic), so the collector never reads half a file (one bad
line makes it drop the whole file), and two writers never interleave. A
batch job's key metric is the time of its last success: it is carried
forward unchanged when a pass fails (outcome.MetricsFile). Samples carry no
timestamps and HELP strings are constants.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

from prometheus_client import CollectorRegistry, Gauge, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import __version__, syscalls
from .scrubcursor import RESULTS

NS = "cis490_reconcile"
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


class Metric(NamedTuple):
    name: str  # after the namespace
    help: str
    labels: tuple[str, ...] = ()

    def full_name(self, command: str) -> str:
        return f"{NS}_{self.name}" if command == "pass" else f"{NS}_scrub_{self.name}"


PASS = (
    Metric("last_run_timestamp_seconds", "When the last pass started (unix time)."),
    Metric("last_success_timestamp_seconds", "When the last successful pass started (unix time)."),
    Metric("last_run_duration_seconds", "How long the last pass took."),
    Metric("last_run_success", "1 if the last pass completed, 0 if it failed or was stopped."),
    Metric("last_run_rows_backfilled", "Rows the last pass appended to the index."),
    Metric("last_run_bytes_read", "Tarball bytes the last pass read."),
    Metric("last_run_lock_wait_seconds", "Time the last pass waited for the index lock."),
    Metric("index_bad_lines", "Lines of index.jsonl that are not rows."),
    Metric("last_run_tarballs", "Tarballs the last pass saw, by what it found.", ("state",)),
    Metric(
        "orphan_rows",
        "Index rows whose tarball is not on disk, as of the last full pass: missing (received within "
        "the retention, or no retention set) or pruned (older).",
        ("kind",),
    ),
)
SCRUB = (
    Metric("last_run_timestamp_seconds", "When the last scrub run started (unix time)."),
    Metric("last_run_duration_seconds", "How long the last scrub run took."),
    Metric("last_run_rows_checked", "Index rows whose tarball the last scrub run checked."),
    Metric("last_run_bytes_read", "Tarball bytes the last scrub run read."),
    Metric("last_run_rows_unverifiable", "Rows the last run could not check (no host_id, digest...)."),
    Metric("last_run_rows", "Rows the last scrub run checked, by result.", ("result",)),
    Metric("round_rows", "Rows checked in the current (or just completed) round, by result.", ("result",)),
    Metric("round", "Number of the current (or just completed) scrub round."),
    Metric("round_progress_ratio", "How far through the index the current round is (by bytes)."),
    Metric(
        "last_round_completed_timestamp_seconds",
        "When the last complete round over the index ended (unix time).",
    ),
)
BUILD_INFO = "Version of cis490-reconcile and its Python."

# One sample, one per label value, or None: declared but unset (a gauge then reads 0, as a
# last success that never happened should). A metric left out of the values is not in the file.
Value = float | Mapping[str, float] | None


def _render(command: str, values: Mapping[str, Value]) -> bytes:
    registry = CollectorRegistry()
    if command == "pass":
        info = Info(f"{NS}_build", BUILD_INFO, registry=registry)
        info.info({"version": __version__, "python": platform.python_version()})
    for metric in PASS if command == "pass" else SCRUB:
        if metric.name not in values:
            continue
        value = values[metric.name]
        gauge = Gauge(metric.full_name(command), metric.help, metric.labels, registry=registry)
        if isinstance(value, Mapping):
            for label, sample in value.items():
                gauge.labels(label).set(sample)
        elif value is not None:
            gauge.set(value)
    return generate_latest(registry)


class Run(Protocol):
    """What the files say of a run (outcome.Outcome is one)."""

    @property
    def started_at(self) -> float: ...  # unix seconds

    @property
    def duration_s(self) -> float: ...

    @property
    def ok(self) -> bool: ...

    @property
    def counts(self) -> Mapping[str, object]: ...  # the pass_finished / scrub_finished facts


def render_pass(o: Run, last_success: float | None) -> bytes:
    c = o.counts
    orphans = c.get("orphan_rows")
    values: dict[str, Value] = {
        "last_run_timestamp_seconds": o.started_at,
        "last_success_timestamp_seconds": last_success,
        "last_run_duration_seconds": o.duration_s,
        "last_run_success": 1.0 if o.ok else 0.0,
        "last_run_rows_backfilled": _number(c.get("backfilled")),
        "last_run_bytes_read": _number(c.get("bytes_read")),
        "last_run_lock_wait_seconds": _number(c.get("lock_wait_s")),
        "index_bad_lines": _number(c.get("bad_index_lines")),
        "last_run_tarballs": {s: float(n) for s in TARBALL_STATES if isinstance(n := c.get(s), int)},
    }
    if isinstance(orphans, tuple):  # known once a full pass has counted them
        values["orphan_rows"] = dict(zip(("missing", "pruned"), map(float, orphans), strict=True))
    return _render("pass", values)


def render_scrub(o: Run) -> bytes:
    run, in_round = o.counts["run"], o.counts["in_round"]
    assert isinstance(run, Mapping) and isinstance(in_round, Mapping)
    values: dict[str, Value] = {
        "last_run_timestamp_seconds": o.started_at,
        "last_run_duration_seconds": o.duration_s,
        "last_run_rows_checked": float(run["checked"]),
        "last_run_bytes_read": float(run["bytes_read"]),
        "last_run_rows_unverifiable": float(run["unverifiable"]),
        "last_run_rows": {r: float(run[r]) for r in RESULTS},
        "round_rows": {r: float(in_round[r]) for r in RESULTS},
        "round": _number(o.counts["round"]),
        "round_progress_ratio": _number(o.counts["round_progress"]),
    }
    if (completed := _number(o.counts.get("last_round_completed_at"))) is not None:
        values["last_round_completed_timestamp_seconds"] = completed
    return _render("scrub", values)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def last_success(path: Path) -> float | None:
    """The last success the file a previous process wrote holds (a new
    process carries it forward, so a failed first pass does not drop it)."""
    try:
        for family in text_string_to_metric_families(path.read_text()):
            if family.name == f"{NS}_last_success_timestamp_seconds" and family.samples:
                return float(family.samples[0].value)
    except (OSError, ValueError):
        pass
    return None


def write(path: Path, data: bytes) -> None:
    """World-readable: node_exporter runs as its own user (Debian's: prometheus),
    and the units' UMask=0027 would leave it a file it cannot open."""
    syscalls.write_atomic(path, data, mode=0o644)
