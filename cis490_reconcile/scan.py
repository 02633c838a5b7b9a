"""What one pass learns of the store's host directories, and what it leaves
for the next pass: which episodes the index lacks, which of those are
settled enough to read, and the memos that let the next pass skip a host
directory that did not change.

A host directory's memo is its (mtime, ctime) when it was listed, plus the
episodes it left unresolved. A directory whose times still match is not
listed again: only its unresolved episodes that the index still lacks are
looked at. Creating, renaming or removing a tarball changes its directory's
mtime, so a match means no episode came or went. The memo is trusted only
if the directory had not changed for GUARD_NS when it was listed (a change
within the same timestamp tick would leave the times equal), and not at all
after the index was replaced (its rows may be different ones now).
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import retention
from .coverage import Coverage, orphans
from .log import Events
from .passdata import PassContext, PassSummary
from .state import NO_MEMO, Memo, Records, State, Unverified
from .store import HostDir, Skipped, Store, Tarball, printable

SCAN_CHUNK = 100_000  # candidate names held at once (a few MB)
GUARD_NS = 3 * 10**9  # a directory changed this recently may change again within its timestamp tick


def unverified(tarball: Tarball, limits: str, reason: str) -> Unverified:
    t = tarball
    return Unverified(t.dev, t.ino, t.size, t.mtime_ns, t.ctime_ns, limits, reason)


def known_unverifiable(records: Records, host: int | None, tarball: Tarball, limits: str) -> str | None:
    """Why a pass found this very file unverifiable under these limits, if
    it did and the file has not changed since; then it is not read again (a
    `zstd --long=31` tarball may be gigabytes). None otherwise."""
    known = None if host is None else records.unverified(host, tarball.episode_id)
    return known.reason if known is not None and known == unverified(tarball, limits, known.reason) else None


@dataclass
class _Host:
    """What this pass learned of one host directory."""

    times: tuple[int, int] | None  # (mtime, ctime) to remember, None: list it next time
    unresolved: set[str] = field(default_factory=set)


class Scan:
    """The listing side of one pass. It counts into the pass's summary;
    `looked_at` is called for each candidate it settles without reading."""

    def __init__(
        self,
        env: PassContext,
        state: State,
        coverage: Coverage,
        events: Events,
        summary: PassSummary,
        looked_at: Callable[[], None],
    ) -> None:
        self.env = env
        self.cfg = env.cfg
        self.state = state
        self.coverage = coverage
        self.events = events
        self.summary = summary
        self.looked_at = looked_at
        self.hosts: dict[str, _Host] = {}
        self.unverified: dict[tuple[str, str], Unverified | None] = {}  # to remember (None: forget)
        self.orphans: dict[str, tuple[int, int]] = {}  # host -> (missing, pruned), full passes
        self.unopened: set[str] = set()  # host directories not opened or listed: no orphans counted
        # Only a full pass over every host sees every host's rows and directory. Decided when the
        # listing starts: a commit that finds the index replaced makes the pass full from then on,
        # but the hosts listed before did not count their orphans (all would be saved as orphans),
        # and in a full pass they counted them against the keys of the old index (index_replaced).
        self._recounts_orphans = False
        self._memos_read: dict[int, Memo] | None = None
        self.unverified_hosts = (
            state.records.unverified_hosts()
        )  # saved only by remember(): fixed for the pass
        self.cutoff = retention.cutoff(self.cfg.retention, time.time())

    def candidates(self, store: Store, checkpoint: Callable[[], None]) -> Iterator[list[tuple[str, str]]]:
        """(host_id, episode_id) of every episode the index lacks, in chunks
        of one host's (at most SCAN_CHUNK)."""
        chunk: list[tuple[str, str]] = []
        self._recounts_orphans = self.summary.full and self.cfg.host is None
        for host_id in store.host_ids(self.cfg.host):
            if isinstance(host_id, Skipped):
                self.skipped(host_id)
                continue
            self.env.notifier.status(f"listing {printable(host_id)}")
            for episode_id in self._host_candidates(store, host_id):
                chunk.append((host_id, episode_id))
                if len(chunk) >= SCAN_CHUNK:
                    yield chunk
                    chunk = []
            if chunk:  # a host's candidates go out at once: verifying them can start
                yield chunk
                chunk = []
            checkpoint()

    def index_replaced(self) -> None:
        """The index was found replaced and read whole again. Once the
        listing has begun (a commit found it), the orphans counted so far
        are of rows it may no longer have: none of this pass's are saved,
        and the last full pass's stand. Before the listing (the pass's own
        catch-up), candidates() decides anew."""
        self._recounts_orphans = False

    def _host_candidates(self, store: Store, host_id: str) -> list[str]:
        host = store.open_host(host_id)
        if host is None and self.cfg.host is not None:
            self.env.log.warning("host_not_found", host_id=host_id)
        if not isinstance(host, HostDir):
            if isinstance(host, Skipped):
                self._skipped_host(host)
            return []
        with host:
            try:
                st = host.stat()
                listed_ns = time.time_ns()
                settled = listed_ns - st.st_mtime_ns >= GUARD_NS and listed_ns - st.st_ctime_ns >= GUARD_NS
                memo = self._memo(host_id)
                times = (st.st_mtime_ns, st.st_ctime_ns)
                self.hosts[host_id] = _Host(times if settled else None)
                if not self.summary.full and memo is not None and memo[:2] == times:
                    self.summary.hosts_unchanged += 1
                    return self._track(host_id, self._still_unindexed(host_id, memo[2]))
                names, skipped = host.entries()
            except OSError as e:
                self._skipped_host(host.unlistable(e))
                self.hosts.pop(host_id, None)
                return []
        self.summary.hosts_listed += 1
        for entry in skipped:
            self.skipped(entry)
        listing = self.coverage.listing(host_id, names, self.cutoff)
        self.summary.scanned += len(names)
        self.summary.already_indexed += len(names) - len(listing.unindexed)
        if self._recounts_orphans:
            self.orphans[host_id] = listing.orphans
        return self._track(host_id, listing.unindexed)

    def _still_unindexed(self, host_id: str, unresolved: Sequence[str]) -> list[str]:
        """The memo's unresolved episodes the index still lacks: a row the
        receiver appended since (its tarball was in flight, or its row
        late) resolves one without reading it, as a listing would."""
        self.summary.scanned += len(unresolved)
        if not unresolved:
            return []
        covered = self.coverage.covered([(host_id, episode_id) for episode_id in unresolved])
        unindexed = [e for e, known in zip(unresolved, covered, strict=True) if not known]
        self.summary.already_indexed += len(unresolved) - len(unindexed)
        return unindexed

    def _memo(self, host_id: str) -> Memo | None:
        host = self.coverage.known_host(host_id)
        return None if host is None else self._memos().get(host, NO_MEMO)

    def _memos(self) -> dict[int, Memo]:
        """Read once, at first use: after the catch-up, which forgets them
        when the index was replaced."""
        if self._memos_read is None:
            self._memos_read = self.state.records.memos()
        return self._memos_read

    def _track(self, host_id: str, episodes: list[str]) -> list[str]:
        self.hosts[host_id].unresolved.update(episodes)
        return episodes

    def settled(self, store: Store, chunk: list[tuple[str, str]]) -> Iterator[Tarball]:
        """The tarballs of a chunk (in host order) old enough to verify and
        not known unverifiable; the rest are counted here."""
        s = self.summary
        for host_id, group in itertools.groupby(chunk, key=operator.itemgetter(0)):
            host = store.open_host(host_id)  # removed or replaced since the listing: next pass
            if not isinstance(host, HostDir):
                continue
            with host:
                for _, episode_id in group:
                    tarball = host.lstat(episode_id)
                    if not isinstance(tarball, Tarball):
                        if isinstance(tarball, Skipped):
                            self.skipped(tarball)
                        if tarball is None or not tarball.unreadable:  # not stat'ed (EIO): still unresolved
                            self._resolved_name(host_id, episode_id)  # gone, or not a file any more
                    elif self._known_unverifiable(tarball):
                        s.unverifiable += 1
                    elif (age_s := tarball.age_s()) >= self.cfg.min_age:
                        yield tarball
                        continue
                    else:
                        s.in_flight += 1
                        self.env.log.debug("tarball_in_flight", path=tarball.path, age_s=round(age_s, 1))
                    self.looked_at()

    def _known_unverifiable(self, tarball: Tarball) -> bool:
        host = self.coverage.known_host(tarball.host_id)
        if host not in self.unverified_hosts:
            return False
        if known_unverifiable(self.state.records, host, tarball, self.env.decoding.key) is None:
            return False
        self.env.log.debug("tarball_unverifiable_unchanged", path=tarball.path)
        return True

    def resolved(self, tarball: Tarball) -> None:
        """The tarball has a row now, or is no longer in its host directory."""
        host = self.hosts.get(tarball.host_id)
        if host is not None:
            host.unresolved.discard(tarball.episode_id)

    def _resolved_name(self, host_id: str, episode_id: str) -> None:
        host = self.hosts.get(host_id)
        if host is not None:
            host.unresolved.discard(episode_id)
        self.unverified[(host_id, episode_id)] = None

    def unverifiable(self, tarball: Tarball, reason: str) -> None:
        """Remember it, so that it is not read again until it changes."""
        key = (tarball.host_id, tarball.episode_id)
        self.unverified[key] = unverified(tarball, self.env.decoding.key, reason)

    def _skipped_host(self, skipped: Skipped) -> None:
        """A host directory not listed. One that could not be opened or
        listed (EACCES, EIO) may hold its tarballs: its rows are no orphans."""
        if skipped.unreadable:
            self.unopened.add(skipped.path)
        self.skipped(skipped)

    def skipped(self, skipped: Skipped) -> None:
        self.summary.skipped += 1
        self.events.warning("store_entry_skipped", path=skipped.path, reason=skipped.reason)

    def remember(self, replaced: bool) -> None:
        """After a completed pass: memos, verdicts and orphan counts, in one
        transaction. After the index was replaced no memo is trusted."""
        host_id = self.coverage.host_id
        with self.state.transaction():
            for name, seen in self.hosts.items():
                host = host_id(name)
                before = self._memos().get(host, NO_MEMO)
                self.state.records.save_memo(host, before, None if replaced else seen.times, seen.unresolved)
            for (name, episode_id), verdict in self.unverified.items():
                self.state.records.save_unverified(host_id(name), episode_id, verdict)
            if self._recounts_orphans:
                for name, host in self.coverage.host_names().items():
                    if host == 0 or name in self.unopened:  # unopened: its last full pass's counts stand
                        continue
                    if name not in self.orphans:  # its directory is gone: every row is an orphan
                        self.orphans[name] = orphans(self.coverage.host_rows(name, self.cutoff))
                    self.state.records.save_orphans(host, *self.orphans[name])
