"""`cis490-reconcile status`: the report, as a table or as JSON; exit 0 when
clean, 1 when something needs attention or the store or index could not be
read (one line on stderr). With --all-orphans, every row whose tarball is
gone, as JSON lines, instead of the report, and the same exit status: a
script sees that a missing row (or anything else) needs attention. See
survey.py for what it reads. A path on a network filesystem is a warning on
stderr: status takes no lock.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from .. import preflight
from ..basics import for_terminal
from ..runtime import ExitCode
from ..store import printable
from ..survey import Report, survey
from . import Context


def run(ctx: Context) -> ExitCode:
    cfg, args = ctx.cfg, ctx.args
    preflight.warn_network_filesystems(cfg, ctx.stderr, "status")
    bar = None if args.all_orphans else ctx.bar("status")
    try:
        report = survey(cfg, bar, orphans=ctx.stdout if args.all_orphans else None)
    except OSError as e:
        ctx.stderr.write(f"cis490-reconcile status: error: {e.filename or cfg.index}: {e.strerror or e}\n")
        return ExitCode.FAILED
    if not args.all_orphans:  # with it, the rows were streamed instead; the exit status is the same
        ctx.stdout.write(json.dumps(report.to_json(), indent=2) + "\n" if args.json else render(report))
    return ExitCode.FAILED if report.attention() else ExitCode.OK


_COLUMNS = (
    ("tarballs", "TARBALLS"),
    ("indexed", "INDEXED"),
    ("unindexed", "UNINDEXED"),
    ("in_flight", "IN FLIGHT"),
    ("corrupt", "CORRUPT"),
    ("unverifiable", "UNVERIFIABLE"),
    ("unreadable", "UNREADABLE"),
    ("missing_rows", "MISSING ROWS"),
    ("pruned_rows", "PRUNED ROWS"),
    ("duplicate_rows", "DUP ROWS"),
)


def render(report: Report) -> str:
    """The human table, then the examples, then the verdict."""
    rows = [(printable(h), asdict(c)) for h, c in sorted(report.hosts.items())]
    rows.append(("TOTAL", asdict(report.totals())))
    width = max([len("HOST"), *(len(h) for h, _ in rows)])
    out = [f"episodes {report.episodes_root}   index {report.index}", ""]
    out.append("  ".join(["HOST".ljust(width), *(title for _, title in _COLUMNS)]))
    for host, counts in rows:
        cells = [str(counts[key]).rjust(len(title)) for key, title in _COLUMNS]
        out.append("  ".join([host.ljust(width), *cells]))
    out += [
        "",
        f"index: {report.index_lines} lines, {report.index_rows} rows "
        f"({report.rows_without_host_id} without host_id), {report.bad_lines} bad, "
        f"torn last line: {'yes' if report.torn_tail else 'no'}",
    ]
    for kind, title in (
        ("bad_lines", "bad index lines"),
        ("missing_rows", "missing tarballs (rows without a tarball)"),
        ("duplicate_rows", "duplicate rows"),
        ("corrupt", "corrupt tarballs"),
        ("unverifiable", "unverifiable tarballs"),
        ("unreadable", "unreadable tarballs"),
        ("skipped", "skipped store entries"),
    ):
        if report.examples[kind]:
            out.append(f"{title}:")
            out += [f"  {_example(kind, e)}" for e in report.examples[kind]]
    if report.state_ignored is not None:  # not "none recorded": there may be a record, failed even
        out.append(f"last pass and scrub: unknown, the state database was not read: {report.state_ignored}")
    else:
        out += [_last_pass(report.last_pass), _last_scrub(report.last_scrub)]
    notes = report.attention()
    out.append("needs attention: " + "; ".join(notes) if notes else "clean")
    return for_terminal(out)


def _example(kind: str, e: dict[str, object]) -> str:
    if kind == "bad_lines":
        return f"line {e['line']} (byte {e['offset']}): {e['reason']}"
    if kind == "missing_rows":
        return f"byte {e['offset']}: {printable(str(e['host_id']))}/{printable(str(e['episode_id']))}"
    if kind == "duplicate_rows":
        name = f"{printable(str(e['host_id']))}/{printable(str(e['episode_id']))}"
        return f"{name}: {e['rows']} rows, the first at byte {e['offset']}"
    return f"{e['path']}: {e['reason']}"


def _last_pass(record: dict[str, object] | None) -> str:
    if record is None:
        return "last pass: none recorded (no state_dir, or no pass yet)"
    line = f"last pass: {record.get('result')}, started {record.get('started_at')}, "
    line += f"{record.get('backfilled')} backfilled, {record.get('corrupt')} corrupt, "
    line += f"{record.get('duration_s')} s"
    return line + (f", error: {record['error']}" if record.get("error") else "")


def _last_scrub(record: dict[str, object] | None) -> str:
    if record is None:
        return "last scrub: none recorded"
    run, progress = record.get("run"), record.get("round_progress")
    counts = run if isinstance(run, dict) else {}
    where = f"at {progress:.0%}" if isinstance(progress, float) else ""
    where = "completed" if record.get("round_completed") else where
    line = f"last scrub: {record.get('result')}, started {record.get('started_at')}, "
    line += f"round {record.get('round')} "
    line += f"{where}, {counts.get('checked')} checked, {counts.get('mismatched')} mismatched, "
    line += f"{counts.get('missing')} missing"
    return line + (f", error: {record['error']}" if record.get("error") else "")
