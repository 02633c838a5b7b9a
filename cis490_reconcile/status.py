"""`cis490-reconcile status`: what needs attention, changing nothing.

Read-only by construction: no lock is taken (the index is append-only, so an
unlocked reader sees whole lines plus at most a torn tail), nothing is
written, not even the state. Three steps; memory is the pass's 16-byte
digest per row and per tarball (47 bytes each at peak, measured):

    1. read the index once: rows by (host_id, episode_id), duplicates, bad
       lines, a torn tail
    2. list the store: each tarball is indexed, in flight (younger than
       min_age), or unindexed; unindexed settled tarballs are verified, as
       the next pass would, so a gap is told apart from a corrupt file
    3. read the same bytes of the index again for the rows whose tarball is
       not on disk (orphans), with their line numbers

It is a snapshot of a store that may be changing: a row or tarball that
arrives between the steps can show up as unindexed or in flight, never
lost. Rows without host_id (old rows) cover their episode on every host and
are counted, not checked for orphans. Lists of examples stop at EXAMPLES;
the counts are always complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TextIO

from . import state
from .config import Config
from .index import IndexedKeys, parse_line, row_key, split_lines
from .pacing import ReadPacer
from .progress import Progress
from .store import HostDir, Skipped, Store, Tarball, printable
from .verify import Corrupt, Intact, Unreadable, Unsettled, Unverifiable, decoding_for, verify_one

EXIT_CLEAN, EXIT_ATTENTION = 0, 1
EXAMPLES = 100
REPORT_VERSION = 1


@dataclass
class HostCounts:
    tarballs: int = 0
    indexed: int = 0
    unindexed: int = 0  # settled, intact: the next pass backfills these
    in_flight: int = 0  # younger than min_age, or changing while read
    corrupt: int = 0  # damaged bytes
    unverifiable: int = 0  # bytes that may be fine but cannot be checked with this configuration
    unreadable: int = 0
    orphan_rows: int = 0
    duplicate_rows: int = 0


@dataclass
class Report:
    episodes_root: str
    index: str
    index_lines: int = 0
    index_rows: int = 0
    rows_without_host_id: int = 0
    bad_lines: int = 0
    torn_tail: bool = False
    skipped: int = 0  # store entries never opened (symlinks, FIFOs, unsafe names)
    hosts: dict[str, HostCounts] = field(default_factory=lambda: defaultdict(HostCounts))
    examples: dict[str, list[dict[str, object]]] = field(default_factory=lambda: defaultdict(list))
    last_pass: dict[str, object] | None = None

    def example(self, kind: str, **facts: object) -> None:
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(facts)

    def totals(self) -> HostCounts:
        total = HostCounts()
        for counts in self.hosts.values():
            for name, value in asdict(counts).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def attention(self) -> list[str]:
        """What an operator should look at, one phrase each; empty when clean."""
        t = self.totals()
        found = [
            (t.unindexed, "settled tarballs not indexed (a pass backfills them)"),
            (t.corrupt, "corrupt tarballs"),
            (t.unverifiable, "unverifiable tarballs (see max_window, zstd_dictionaries)"),
            (t.unreadable, "unreadable tarballs"),
            (t.orphan_rows, "orphan rows (row without tarball)"),
            (t.duplicate_rows, "duplicate rows"),
            (self.bad_lines, "bad index lines"),
            (self.skipped, "store entries skipped"),
            (int(self.torn_tail), "torn last index line"),
        ]
        notes = [f"{what}: {n}" for n, what in found if n]
        if self.last_pass is not None and self.last_pass.get("result") == "failed":
            notes.append(f"last pass failed: {self.last_pass.get('error')}")
        return notes

    def to_json(self) -> dict[str, object]:
        return {
            "report_version": REPORT_VERSION,
            "episodes_root": self.episodes_root,
            "index": self.index,
            "clean": not self.attention(),
            "attention": self.attention(),
            "totals": asdict(self.totals()),
            "hosts": {h: asdict(c) for h, c in sorted(self.hosts.items())},
            "index_file": {
                "lines": self.index_lines,
                "rows": self.index_rows,
                "rows_without_host_id": self.rows_without_host_id,
                "bad_lines": self.bad_lines,
                "torn_tail": self.torn_tail,
            },
            "skipped_entries": self.skipped,
            **{
                kind: self.examples[kind]
                for kind in (
                    "bad_lines",
                    "orphan_rows",
                    "duplicate_rows",
                    "corrupt",
                    "unverifiable",
                    "unreadable",
                    "skipped",
                )
            },
            "examples_cap": EXAMPLES,
            "last_pass": self.last_pass,
        }


class _Survey:
    def __init__(self, cfg: Config, bar: Progress | None) -> None:
        self.cfg = cfg
        self.bar = bar
        self.report = Report(str(cfg.episodes_root), str(cfg.index))
        self.rows = IndexedKeys()  # distinct keys of rows with a host_id
        self.on_disk = IndexedKeys()  # tarballs listed
        self.index_size = 0
        self.files = self.bytes_read = 0
        self.fraction = 0.0  # of the host directories listed
        self.pacer = ReadPacer(cfg.max_read_rate, lambda: None)
        self.decoding = decoding_for(cfg, workers=1)[1]

    def _wanted(self, host_id: str) -> bool:
        return self.cfg.host is None or host_id == self.cfg.host

    def read_index(self, fd: int) -> None:
        r = self.report
        self.index_size = os.fstat(fd).st_size
        for line, (offset, next_offset, raw) in enumerate(split_lines(fd, 0, self.index_size), 1):
            if next_offset < 0:
                r.torn_tail = True
                break
            r.index_lines = line
            row = parse_line(raw)
            if row is None:
                continue
            if isinstance(row, str):
                r.bad_lines += 1
                r.example("bad_lines", line=line, offset=offset, reason=row)
                continue
            r.index_rows += 1
            host_id, episode_id = row_key(row)
            if host_id is None:
                r.rows_without_host_id += 1
                self.rows.hostless.add(episode_id)
            elif self._wanted(host_id):
                if self.rows.has_row(host_id, episode_id):
                    r.hosts[host_id].duplicate_rows += 1
                    r.example("duplicate_rows", line=line, host_id=host_id, episode_id=episode_id)
                else:
                    self.rows.add(host_id, episode_id)
                    r.hosts[host_id].orphan_rows += 1  # until its tarball is found

    def _skipped(self, skipped: Skipped) -> None:
        self.report.skipped += 1
        self.report.example("skipped", path=skipped.path, reason=skipped.reason)

    def list_store(self) -> None:
        with Store(self.cfg.episodes_root) as store:
            host_ids = store.host_ids(self.cfg.host)
            for done, host_id in enumerate(host_ids):
                if isinstance(host_id, Skipped):
                    self._skipped(host_id)
                    continue
                host = store.open_host(host_id)
                if isinstance(host, Skipped):
                    self._skipped(host)
                elif host is not None:
                    with host:
                        self._host(store, host)
                self.fraction = (done + 1) / len(host_ids)

    def _host(self, store: Store, host: HostDir) -> None:
        counts = self.report.hosts[host.host_id]
        for entry in host.entries():
            if isinstance(entry, Skipped):
                self._skipped(entry)
                continue
            tarball = host.lstat(entry)
            if isinstance(tarball, Skipped):
                self._skipped(tarball)
                continue
            if tarball is None:
                continue  # removed since the listing
            counts.tarballs += 1
            self.on_disk.add(host.host_id, entry)
            if self.rows.has_row(host.host_id, entry):
                counts.indexed += 1
                counts.orphan_rows -= 1
            elif entry in self.rows.hostless:
                counts.indexed += 1
            elif (time.time_ns() - tarball.ctime_ns) / 1e9 < self.cfg.min_age:
                counts.in_flight += 1
            else:
                self._verify(store, tarball, counts)
            self._show()

    def _verify(self, store: Store, tarball: Tarball, counts: HostCounts) -> None:
        def on_read(n: int) -> None:
            self.bytes_read += n
            self.pacer.consume(n)
            self._show()

        verdict = verify_one(store, tarball, self.decoding, on_read)
        self.files += 1
        if isinstance(verdict, Intact):
            counts.unindexed += 1
        elif isinstance(verdict, Unsettled):
            counts.in_flight += 1
        elif isinstance(verdict, Unreadable):
            counts.unreadable += 1
            self.report.example("unreadable", path=printable(tarball.path), reason=verdict.reason)
        elif isinstance(verdict, Corrupt):
            counts.corrupt += 1
            self.report.example("corrupt", path=printable(tarball.path), reason=verdict.reason)
        elif isinstance(verdict, Unverifiable):
            counts.unverifiable += 1
            self.report.example("unverifiable", path=printable(tarball.path), reason=verdict.reason)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(self.files, self.bytes_read, self.fraction)

    def find_orphans(self, fd: int) -> None:
        """Line numbers of the first orphan rows (the counts are already known)."""
        if not any(c.orphan_rows for c in self.report.hosts.values()):
            return
        shown: set[tuple[str, str]] = set()
        for line, (_, next_offset, raw) in enumerate(split_lines(fd, 0, self.index_size), 1):
            if next_offset < 0 or len(shown) >= EXAMPLES:
                break
            row = parse_line(raw)
            if not isinstance(row, dict):
                continue
            host_id, episode_id = row_key(row)
            if host_id is None or not self._wanted(host_id):
                continue
            if not self.on_disk.has_row(host_id, episode_id) and (host_id, episode_id) not in shown:
                shown.add((host_id, episode_id))
                self.report.example("orphan_rows", line=line, host_id=host_id, episode_id=episode_id)


def survey(cfg: Config, bar: Progress | None = None) -> Report:
    s = _Survey(cfg, bar)
    try:
        fd = os.open(cfg.index, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None  # nothing indexed yet
    try:
        if fd is not None:
            s.read_index(fd)
        s.list_store()
        if fd is not None:
            s.find_orphans(fd)
    finally:
        if fd is not None:
            os.close(fd)
        if bar is not None:
            bar.clear()
    if cfg.state_dir is not None:
        s.report.last_pass = state.load_last_pass(cfg.state_dir)
    return s.report


_COLUMNS = (
    ("tarballs", "TARBALLS"),
    ("indexed", "INDEXED"),
    ("unindexed", "UNINDEXED"),
    ("in_flight", "IN FLIGHT"),
    ("corrupt", "CORRUPT"),
    ("unverifiable", "UNVERIFIABLE"),
    ("unreadable", "UNREADABLE"),
    ("orphan_rows", "ORPHAN ROWS"),
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
        ("orphan_rows", "orphan rows (no tarball on disk)"),
        ("duplicate_rows", "duplicate rows"),
        ("corrupt", "corrupt tarballs"),
        ("unverifiable", "unverifiable tarballs"),
        ("unreadable", "unreadable tarballs"),
        ("skipped", "skipped store entries"),
    ):
        if report.examples[kind]:
            out.append(f"{title}:")
            out += [f"  {_example(kind, e)}" for e in report.examples[kind]]
    out.append(_last_pass(report.last_pass))
    notes = report.attention()
    out.append("needs attention: " + "; ".join(notes) if notes else "clean")
    return "\n".join(out) + "\n"


def _example(kind: str, e: dict[str, object]) -> str:
    if kind == "bad_lines":
        return f"line {e['line']} (byte {e['offset']}): {e['reason']}"
    if kind in ("orphan_rows", "duplicate_rows"):
        return f"line {e['line']}: {printable(str(e['host_id']))}/{printable(str(e['episode_id']))}"
    return f"{e['path']}: {e['reason']}"


def _last_pass(record: dict[str, object] | None) -> str:
    if record is None:
        return "last pass: none recorded (no state_dir, or no pass yet)"
    line = f"last pass: {record.get('result')}, started {record.get('started_at')}, "
    line += f"{record.get('backfilled')} backfilled, {record.get('corrupt')} corrupt, "
    line += f"{record.get('duration_s')} s"
    return line + (f", error: {record['error']}" if record.get("error") else "")


def main(cfg: Config, out: TextIO, as_json: bool, bar: Progress | None, err: TextIO = sys.stderr) -> int:
    """Print the report; exit 0 clean, 1 something needs attention or the
    store or index could not be read (one line on `err`)."""
    try:
        report = survey(cfg, bar)
    except OSError as e:
        err.write(f"cis490-reconcile status: error: {e.filename or cfg.index}: {e.strerror or e}\n")
        return EXIT_ATTENTION
    out.write(json.dumps(report.to_json(), indent=2) + "\n" if as_json else render(report))
    return EXIT_ATTENTION if report.attention() else EXIT_CLEAN
