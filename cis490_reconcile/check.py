"""One tarball, one answer: the verifier a pass uses, pointed at named files.

For an operator paged about one file, or whose shipper has just re-sent it.
Each file is read once by verify.examine_file, exactly as a pass reads it
(the same limits: max_window, zstd_dictionaries, max_read_rate; the same
bounded memory), and the answer says:

- the verdict (intact, corrupt, unverifiable, unreadable, unsettled) and
  the reason a pass would log;
- what the read saw: sha256, size, zstd frames and the largest window;
- the commit a pass would record, and the row it would append;
- when the file changed less than min_age ago: a pass would wait for it;
- for a file under the episodes root, what the index says: not indexed,
  indexed and the row matches, or indexed and which fields differ; or, for
  a name a pass passes over (store.passed_host, passed_file: a dot-name,
  lost+found, an unsafe name), that and why, and no row: it is never indexed.

Read-only, like status: no lock is taken and nothing of the store, the index
or the state is written. The index is looked up through the state database
of the last pass, opened read-only, and only the rows appended since are
read (into a temporary database); without a state database the whole index
is read that way, in bounded memory. A symlink or anything but a regular
file is refused as a pass refuses it (never opened). A file outside the
episodes root is still verified, under its directory's name as host_id.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import index, statedir
from .config import Config
from .coverage import Coverage
from .log import Logger
from .reading import ReadPacer
from .store import SUFFIX, HostDir, Skipped, Store, Tarball, passed_file, passed_host
from .verdicts import Corrupt, Intact, Unreadable, Unsettled, Unverifiable, Verdict, decoding_for
from .verify import Seen, examine_file

_VERDICT_NAMES: dict[type, str] = {
    Intact: "intact",
    Corrupt: "corrupt",
    Unverifiable: "unverifiable",
    Unreadable: "unreadable",
    Unsettled: "unsettled",
}


@dataclass
class Lookup:
    """What the index says of the file's (host_id, episode_id)."""

    found: str  # "not indexed", "matches", "differs", "not compared" (nothing read to compare)
    offset: int | None = None  # where the first row that covers it starts
    differences: dict[str, tuple[object, object]] = field(default_factory=dict)  # field: (row, file)


@dataclass
class Answer:
    path: str  # as given
    verdict: str  # intact, corrupt, unverifiable, unreadable, unsettled
    reason: str | None
    host_id: str
    episode_id: str
    under_root: bool
    passed: str | None = None  # why a pass passes over this store file (never indexed), or None
    seen: Seen | None = None
    commit: str | None = None
    commit_note: str | None = None  # why a row would have no commit
    age_s: float | None = None  # since the file last changed (its ctime)
    min_age_s: float = 0.0
    lookup: Lookup | None = None
    row: bytes | None = None  # what a pass writes for it (intact only), backfilled_at aside

    @property
    def in_flight(self) -> bool:
        return self.age_s is not None and self.age_s < self.min_age_s

    @property
    def damaged(self) -> bool:
        """Corrupt, or at odds with its row."""
        return self.verdict == "corrupt" or (self.lookup is not None and self.lookup.found == "differs")

    @property
    def undecided(self) -> bool:
        """Not damaged as far as we can tell, but not proven intact either, or
        a file a pass passes over (it never gets a row)."""
        return (self.verdict != "intact" or self.passed is not None) and not self.damaged

    @property
    def pass_would_append(self) -> bool:
        return (
            self.row is not None
            and self.under_root
            and self.passed is None
            and not self.in_flight
            and self.lookup is not None
            and self.lookup.found == "not indexed"
        )

    def to_json(self) -> dict[str, object]:
        seen = self.seen
        lookup = self.lookup
        return {
            "path": self.path,
            "verdict": self.verdict,
            "reason": self.reason,
            "host_id": self.host_id,
            "episode_id": self.episode_id,
            "under_episodes_root": self.under_root,
            "pass_skips": self.passed,
            "size_bytes": None if seen is None else seen.size,
            "sha256": None if seen is None else seen.sha256,
            "zstd": None
            if seen is None
            else {"frames": seen.frames, "max_window": seen.max_window, "checksummed": seen.checksummed},
            "commit": self.commit,
            "commit_note": self.commit_note,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "in_flight": self.in_flight,
            "index": None
            if lookup is None
            else {
                "found": lookup.found,
                "offset": lookup.offset,
                "differences": {k: {"row": r, "file": f} for k, (r, f) in lookup.differences.items()},
            },
            "row": None if self.row is None else self.row.decode("ascii").rstrip("\n"),
            "pass_would_append": self.pass_would_append,
        }


class _Index:
    """The index as the next pass would see it: the state database's view,
    caught up with the rows appended since (statedir.view)."""

    def __init__(self, cfg: Config, log: Logger) -> None:
        self._held = contextlib.ExitStack()
        try:
            view = self._held.enter_context(statedir.view(cfg, log))
            self.coverage = Coverage(view)
            self.fd = index.open_for_reading(cfg.index)
            if self.fd is not None:
                self._held.callback(os.close, self.fd)
                self.coverage.catch_up(self.fd, full=False)
        except BaseException:
            self._held.close()
            raise

    def close(self) -> None:
        self._held.close()

    def lookup(self, host_id: str, episode_id: str, file: dict[str, object]) -> Lookup:
        """Find the row that covers the episode and compare the fields the
        file can speak to (`file`: field -> its value; None: unknown)."""
        offset = None if self.fd is None else self.coverage.first_row(host_id, episode_id)
        if offset is None:
            return Lookup("not indexed")
        assert self.fd is not None
        try:
            row = json.loads(index.line_at(self.fd, offset))
        except ValueError:
            row = {}
        if all(mine is None for mine in file.values()):  # unread: neither matches nor differs
            return Lookup("not compared", offset)
        differences: dict[str, tuple[object, object]] = {}
        for key, mine in file.items():
            theirs = row.get(key) if isinstance(row, dict) else None
            if mine is None or (key == "commit" and theirs is None):
                continue  # nothing to compare: the file could not say, or the row does not
            same = theirs == mine or (isinstance(theirs, str) and theirs.lower() == mine)
            if not same:
                differences[key] = (theirs, mine)
        return Lookup("differs" if differences else "matches", offset, differences)


class Checker:
    """Answers for named files, one at a time; close() when done."""

    def __init__(self, cfg: Config, log: Logger, checkpoint: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.log = log
        self.decoding = decoding_for(cfg, workers=1)[1]
        self.pacer = ReadPacer(cfg.max_read_rate, checkpoint)
        self.checkpoint = checkpoint
        self.root = os.path.realpath(cfg.episodes_root)
        self._index: _Index | None = None

    def close(self) -> None:
        if self._index is not None:
            self._index.close()

    def _on_read(self, n: int) -> None:
        self.pacer.consume(n)
        self.checkpoint()

    def check(self, path: Path) -> Answer:
        given = str(path)
        if path.parent.name in ("", ".."):  # "ep.tar.zst", "../ep.tar.zst": its directory has a name
            path = Path(os.path.realpath(path.parent), path.name)
        elif os.path.realpath(path.parent.parent) != self.root:
            directory = Path(os.path.realpath(path.parent))
            if str(directory.parent) == self.root:  # a host directory, through a symlink outside the store
                path = directory / path.name
        episode_id = path.name.removesuffix(SUFFIX)
        host_id = path.parent.name if path.parent != path else ""
        under_root = bool(host_id) and os.path.realpath(path.parent.parent) == self.root
        answer = Answer(given, "unreadable", None, host_id, episode_id, under_root)
        if under_root:  # asked as the listing asks: a pass passes it over, never indexes it
            passed = passed_host(host_id) or passed_file(path.name)
            answer.passed = None if passed is None else passed.reason
        answer.min_age_s = self.cfg.min_age
        host = self._open_host(path, under_root)
        if not isinstance(host, HostDir):
            answer.reason = host
            return self._looked_up(answer)
        with host:
            tarball = host.lstat(episode_id)
            if not isinstance(tarball, Tarball):
                answer.reason = "no such file" if tarball is None else f"{tarball.reason}: never opened"
                return self._looked_up(answer)
            answer.age_s = tarball.age_s()
            verdict, answer.seen = examine_file(host, tarball, self.decoding, self._on_read)
        self._describe(answer, tarball, verdict)
        return self._looked_up(answer)

    def _looked_up(self, answer: Answer) -> Answer:
        """A file in the store, even one gone or refused, is asked about in
        the index; not one a pass passes over (no row of it is ever its)."""
        if answer.under_root and answer.passed is None:
            answer.lookup = self._lookup(answer)
        return answer

    def _open_host(self, path: Path, under_root: bool) -> HostDir | str:
        """The file's directory: through the episodes root as a pass opens it
        (never through a symlink) when the file lies under it, else as named."""
        if under_root:
            with Store(self.cfg.episodes_root) as store:
                host = store.open_host(path.parent.name)
            if isinstance(host, Skipped):
                return host.reason
            return "no such directory" if host is None else host
        try:
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            return f"cannot open its directory: {e.strerror}"
        return HostDir(path.parent.name, fd)

    @staticmethod
    def _describe(answer: Answer, tarball: Tarball, verdict: Verdict) -> None:
        answer.verdict = _VERDICT_NAMES[type(verdict)]
        if isinstance(verdict, Intact):
            answer.commit, answer.commit_note = verdict.commit, verdict.commit_note
            if answer.passed is None:
                answer.row = index.encode_row(index.backfill_row(tarball, verdict, time.time_ns()))
        else:
            answer.reason = verdict.reason

    def _lookup(self, answer: Answer) -> Lookup:
        if self._index is None:
            self._index = _Index(self.cfg, self.log)
        # bytes of a file that changed while read are no one version of it: nothing to compare
        seen = None if answer.verdict == "unsettled" else answer.seen
        file: dict[str, object] = {
            "sha256": None if seen is None else seen.sha256,
            "size_bytes": None if seen is None else seen.size,
            "commit": answer.commit if answer.verdict == "intact" else None,
        }
        return self._index.lookup(answer.host_id, answer.episode_id, file)
