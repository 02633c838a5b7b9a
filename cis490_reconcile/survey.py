"""What needs attention in a store, found without changing anything (for `status`).

Read-only by construction: no lock is taken (the index is append-only, so an
unlocked reader sees whole lines plus at most a torn tail) and nothing of the
store or of the state is written. The state database of the last pass is
opened read-only, so only the index's rows since that pass are read (into a
temporary database, removed at the end); without one, the whole index is read
that way, in bounded memory. Then:

    1. list the store: each tarball is indexed, in flight (younger than
       min_age), or unindexed; unindexed settled tarballs are verified, as the
       next pass would, so a gap is told apart from a corrupt file
    2. per host, rows without a tarball: missing (received within the
       retention, or no retention set), or pruned (older: normal); and rows
       that repeat a key (duplicates)

It is a snapshot of a store that may be changing: a row or tarball that
arrives meanwhile can show up as unindexed or in flight, never lost. Rows
without host_id cover their episode on every host and are counted, not
checked for orphans. Lists of examples stop at EXAMPLES; counts are complete,
and --all-orphans streams every row without a tarball instead of the report.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TextIO

from . import index, retention, statedir
from .config import Config
from .coverage import Coverage, orphans
from .indexkeys import digest
from .log import Logger, make_logger
from .reading import ReadPacer
from .scan import known_unverifiable
from .state import EXAMPLES, HostRows, State, damaged
from .store import HostDir, Skipped, Store, Tarball, printable
from .termbar import TerminalBar
from .verdicts import Corrupt, Intact, Unreadable, Unsettled, Unverifiable, Verdict, decoding_for
from .verify import verify_one

REPORT_VERSION = 2


@dataclass
class HostCounts:
    tarballs: int = 0
    indexed: int = 0
    unindexed: int = 0  # settled, intact: the next pass backfills these
    in_flight: int = 0  # younger than min_age, or changing while read
    corrupt: int = 0  # damaged bytes
    unverifiable: int = 0  # bytes that may be fine but cannot be checked with this configuration
    unreadable: int = 0
    missing_rows: int = 0  # rows whose tarball is gone, received within the retention (or no retention)
    pruned_rows: int = 0  # rows whose tarball is gone, received before the retention: normal
    duplicate_rows: int = 0


EXAMPLE_KINDS = (
    "bad_lines",
    "missing_rows",
    "duplicate_rows",
    "corrupt",
    "unverifiable",
    "unreadable",
    "skipped",
)


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
    hosts: dict[str, HostCounts] = field(default_factory=dict)
    examples: dict[str, list[dict[str, object]]] = field(
        default_factory=lambda: {k: [] for k in EXAMPLE_KINDS}
    )
    last_pass: dict[str, object] | None = None
    last_scrub: dict[str, object] | None = None
    unknown_host: str | None = None  # --host named no directory and no row: a typo, most likely
    state_ignored: str | None = None  # why the state database was not read: last pass and scrub unknown

    def host(self, host_id: str) -> HostCounts:
        return self.hosts.setdefault(host_id, HostCounts())

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
            (t.missing_rows, "missing tarballs (rows without a tarball, within the retention)"),
            (t.duplicate_rows, "duplicate rows"),
            (self.bad_lines, "bad index lines"),
            (self.skipped, "store entries skipped"),
            (int(self.torn_tail), "torn last index line"),
        ]
        notes = [f"{what}: {n}" for n, what in found if n]
        if self.unknown_host is not None:
            notes.append(f"no directory and no rows for --host {printable(self.unknown_host)}")
        if self.last_pass is not None and self.last_pass.get("result") == "failed":
            notes.append(f"last pass failed: {self.last_pass.get('error')}")
        if self.last_scrub is not None and self.last_scrub.get("result") == "failed":
            run = self.last_scrub.get("run")
            problems = (
                {k: run.get(k) for k in ("mismatched", "missing", "unreadable")}
                if isinstance(run, dict)
                else {}
            )
            error = self.last_scrub.get("error")
            notes.append(f"last scrub failed: {error}" if error else f"last scrub found {_counted(problems)}")
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
            **self.examples,
            "examples_cap": EXAMPLES,
            "last_pass": self.last_pass,
            "last_scrub": self.last_scrub,
            "state_ignored": self.state_ignored,
        }


class Survey:
    def __init__(
        self, cfg: Config, log: Logger, view: State, fd: int | None, bar: TerminalBar | None
    ) -> None:
        self.cfg = cfg
        self.view = view
        self.fd = fd
        self.bar = bar
        self.coverage = Coverage(view)
        self.report = Report(str(cfg.episodes_root), str(cfg.index))
        self.cutoff = retention.cutoff(cfg.retention, time.time())
        self.decoding = decoding_for(cfg, workers=1)[1]
        self.pacer = ReadPacer(cfg.max_read_rate, lambda: None)
        self.files = self.bytes_read = 0
        self.fraction = 0.0  # of the host directories listed
        self.listed: set[str] = set()  # hosts listed, or whose directory is gone
        self.unopened: set[str] = set()  # directories that could not be opened: no orphans counted

    def _wanted(self, host_id: str) -> bool:
        return self.cfg.host is None or host_id == self.cfg.host

    def read_index(self) -> None:
        r = self.report
        found = self.coverage.catch_up(self.fd, full=False)  # None: no index, no row
        r.torn_tail = found.torn is not None
        cp = self.view.keys.checkpoint() or self.view.keys.checkpoint(self.view.last)
        if cp is not None:
            r.index_lines, r.bad_lines = cp.lines, cp.bad_lines
        for line, offset, reason in self.view.keys.bad_line_examples():
            r.example("bad_lines", line=line, offset=offset, reason=reason)
        rows = self.view.keys.all_rows()
        for host, extra in self.coverage.base_duplicates.items():
            rows[host] = rows.get(host, 0) + extra
        r.index_rows = sum(rows.values())
        r.rows_without_host_id = rows.get(0, 0)

    def list_store(self) -> None:
        with Store(self.cfg.episodes_root) as store:
            host_ids = store.host_ids(self.cfg.host)
            for done, host_id in enumerate(host_ids):
                if isinstance(host_id, Skipped):
                    self._skipped(host_id)
                    continue
                host = store.open_host(host_id)
                if isinstance(host, Skipped):
                    self._skipped_host(host)
                elif host is not None:
                    with host:
                        self._host(store, host)
                self.fraction = (done + 1) / len(host_ids)

    def _skipped(self, skipped: Skipped) -> None:
        self.report.skipped += 1
        self.report.example("skipped", path=skipped.path, reason=skipped.reason)

    def _skipped_host(self, skipped: Skipped) -> None:
        """A host directory not listed; one that could not be opened or
        listed (EACCES, EIO) may hold its tarballs: its rows are no orphans."""
        self._skipped(skipped)
        if skipped.unreadable:
            self.unopened.add(skipped.path)

    def _host(self, store: Store, host: HostDir) -> None:
        try:
            names, skipped = host.entries()
        except OSError as e:
            self._skipped_host(host.unlistable(e))
            return
        counts = self.report.host(host.host_id)
        for entry in skipped:
            self._skipped(entry)
        listing = self.coverage.listing(host.host_id, names, self.cutoff)
        self._rows(host.host_id, listing.rows, listing.orphans)
        self.listed.add(host.host_id)
        unindexed = set(listing.unindexed)
        for name in names:
            tarball = host.lstat(name)
            if isinstance(tarball, Skipped):
                self._skipped(tarball)
            elif tarball is not None:
                counts.tarballs += 1
                if name not in unindexed:
                    counts.indexed += 1
                elif tarball.age_s() < self.cfg.min_age:
                    counts.in_flight += 1
                else:
                    self._verify(store, tarball, counts)
            self._show()

    def _rows(self, host_id: str, rows: HostRows, without_tarball: tuple[int, int]) -> None:
        counts = self.report.host(host_id)
        counts.missing_rows, counts.pruned_rows = without_tarball
        counts.duplicate_rows = rows.duplicates

    def _verify(self, store: Store, tarball: Tarball, counts: HostCounts) -> None:
        """As the next pass would: a file it found unverifiable and that has
        not changed since is not read again (nor by the pass)."""

        def on_read(n: int) -> None:
            self.bytes_read += n
            self.pacer.consume(n)
            self._show()

        host = self.coverage.known_host(tarball.host_id)
        known = known_unverifiable(self.view.records, host, tarball, self.decoding.key)
        verdict: Verdict = (
            Unverifiable(known) if known is not None else verify_one(store, tarball, self.decoding, on_read)
        )
        self.files += known is None
        path = printable(tarball.path)
        if isinstance(verdict, Intact):
            counts.unindexed += 1
        elif isinstance(verdict, Unsettled):
            counts.in_flight += 1
        elif isinstance(verdict, Unreadable):
            counts.unreadable += 1
            self.report.example("unreadable", path=path, reason=verdict.reason)
        elif isinstance(verdict, Corrupt):
            counts.corrupt += 1
            self.report.example("corrupt", path=path, reason=verdict.reason)
        elif isinstance(verdict, Unverifiable):
            counts.unverifiable += 1
            self.report.example("unverifiable", path=path, reason=verdict.reason)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.update(self.files, self.bytes_read, self.fraction)

    def gone_hosts(self) -> None:
        """Hosts with rows but no directory: every row is without a tarball.
        (Not a directory that could not be opened: its tarballs may be there.)"""
        for host_id, host in self.coverage.host_names().items():
            if (
                host
                and host_id not in self.report.hosts
                and host_id not in self.unopened
                and self._wanted(host_id)
            ):
                rows = self.coverage.host_rows(host_id, self.cutoff)
                self._rows(host_id, rows, orphans(rows))
                self.listed.add(host_id)
        self.report.hosts = {
            h: c for h, c in self.report.hosts.items() if c != HostCounts() or h in self.listed
        }
        only = self.cfg.host
        if only is not None and only not in self.listed and not self.report.skipped:  # skipped: said
            self.report.unknown_host = only

    def orphan_rows(self, missing_only: bool) -> Iterator[dict[str, object]]:
        """Rows whose tarball is gone (only the missing ones, or all), named
        from the index itself. Only hosts with such rows are looked at, each
        until its count is found, and its directory is listed again then:
        memory is one host's listing, not the store's."""
        assert self.fd is not None
        with Store(self.cfg.episodes_root) as store:
            for host_id in sorted(self.listed):
                counts = self.report.hosts[host_id]  # every host listed (or gone) was counted
                host = self.coverage.known_host(host_id)
                left = counts.missing_rows + (0 if missing_only else counts.pruned_rows)
                if host is None or left <= 0:
                    continue
                listed = _tarball_digests(store, host_id)
                if listed is None:
                    continue
                for key, offset, received, _ in self.view.keys.rows(
                    host, since=self.cutoff if missing_only else None
                ):
                    if key in listed:
                        continue
                    row = index.row_at(self.fd, offset)
                    if row is not None:
                        kind = "pruned" if retention.older(received, self.cutoff) else "missing"
                        yield {
                            "host_id": host_id,
                            "episode_id": row.episode_id,
                            "offset": offset,
                            "kind": kind,
                        }
                    left -= 1
                    if not left:
                        break

    def examples(self) -> None:
        r = self.report
        if self.fd is None:
            return
        if r.totals().missing_rows:
            for found in self.orphan_rows(missing_only=True):
                r.example("missing_rows", **{k: v for k, v in found.items() if k != "kind"})
                if len(r.examples["missing_rows"]) >= EXAMPLES:
                    break
        for host_id in sorted(self.listed):
            host = self.coverage.known_host(host_id)
            if host is None or not r.hosts[host_id].duplicate_rows:
                continue
            # rows the tail repeats of a key of the state's: one copy there unless rows() has it
            tail = {d: n for (h, d), n in self.coverage.base_duplicated.items() if h == host}
            for d, offset, _, copies in self.view.keys.rows(host, min_copies=2):
                self._duplicate(host_id, offset, copies + tail.pop(d, 0))
            for d, n in tail.items():
                if (first := self.view.keys.first_row(host, d)) is not None:
                    self._duplicate(host_id, first, 1 + n)

    def _duplicate(self, host_id: str, offset: int, copies: int) -> None:
        assert self.fd is not None
        row = index.row_at(self.fd, offset)
        if row is not None:
            self.report.example(
                "duplicate_rows", host_id=host_id, episode_id=row.episode_id, offset=offset, rows=copies
            )


def _tarball_digests(store: Store, host_id: str) -> set[bytes] | None:
    """The digests of a host directory's episode names: none when it is
    gone or not a directory, None when it cannot be opened or listed now
    (EACCES, EIO: its tarballs may all be there, so no row is named)."""
    host = store.open_host(host_id)
    if isinstance(host, Skipped):
        return None if host.unreadable else set()
    if host is None:
        return set()
    with host:
        try:
            return {digest(name) for name in host.entries()[0]}
        except OSError:
            return None


def survey(
    cfg: Config, bar: TerminalBar | None = None, log: Logger | None = None, orphans: TextIO | None = None
) -> Report:
    """The report (or, with `orphans`, every row without a tarball streamed there)."""
    log = log or make_logger("error", sys.stderr)
    try:
        try:
            return _survey(cfg, bar, log, orphans, with_state=True)
        except _StateDamaged as e:
            log.info("state_ignored", state_file=statedir.database(cfg), reason=str(e))
            report = _survey(cfg, bar, log, orphans, with_state=False)
            report.state_ignored = str(e)
            return report
    finally:
        if bar is not None:
            bar.clear()


class _StateDamaged(Exception):
    """The state's file failed a read its open did not make (a damaged
    page), before anything was streamed: the survey starts again without it."""


def _survey(
    cfg: Config, bar: TerminalBar | None, log: Logger, orphans: TextIO | None, with_state: bool
) -> Report:
    streamed = False
    with statedir.view(cfg, log, with_state) as view:
        based = view.base
        fd = index.open_for_reading(cfg.index)
        try:
            s = Survey(cfg, log, view, fd, bar)
            s.report.state_ignored = view.base_ignored
            # first: a replaced index is read whole into keys of our own, without the state's records
            s.report.last_pass = view.records.get("last_pass", view.last)
            s.report.last_scrub = view.records.get("last_scrub", view.last)
            s.read_index()
            s.list_store()
            s.gone_hosts()
            if orphans is not None and fd is not None:
                for found in s.orphan_rows(missing_only=False):
                    orphans.write(json.dumps(found) + "\n")
                    streamed = True
            else:
                s.examples()
        except sqlite3.DatabaseError as e:
            if not based or streamed or not damaged(e):
                raise
            raise _StateDamaged(f"not a usable database: {e}") from e
        finally:
            if fd is not None:
                os.close(fd)
    return s.report


def _counted(found: dict[str, object]) -> str:
    return ", ".join(f"{n} {what}" for what, n in found.items() if n) or "nothing"
