"""One index row against its tarball, for scrub: what the row claims, what
the file at its path says (read once, hashed, paced), and the event for it.
Only a regular file is read; a symlink, FIFO or directory is a missing
tarball. A row received before the retention cutoff whose tarball is gone
is pruned: one lstat, no event."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import NamedTuple

from . import retention
from .indexkeys import received_seconds
from .log import MAX_EVENTS, Logger
from .reading import HashingReader
from .rows import Row
from .store import SUFFIX, NotRegularFile, Skipped, Store, is_safe_name

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class Checkable(NamedTuple):
    """What a row claims about a tarball, once we know we can check it."""

    host_id: str
    episode_id: str
    sha256: str  # lowercase hex
    size: int
    received: int | None  # unix seconds

    @property
    def path(self) -> str:
        return f"{self.host_id}/{self.episode_id}{SUFFIX}"


def checkable(row: Row) -> Checkable | str:
    """The row's claim, or why it cannot be checked."""
    sha256, size = row.sha256, row.size_bytes
    if row.host_id is None:
        return "no host_id"
    if not is_safe_name(row.host_id) or not is_safe_name(row.episode_id):
        return "host_id or episode_id is not a safe file name"
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        return "sha256 is not 64 hex characters"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "size_bytes is not an integer >= 0"
    return Checkable(
        row.host_id, row.episode_id, sha256.lower(), size, received_seconds(row.received_at_wall)
    )


class Found(NamedTuple):
    result: str  # one of scrubcursor.RESULTS
    reason: str | None = None
    sha256: str | None = None  # of the bytes on disk, when they were all read
    size: int | None = None


def check(store: Store, claim: Checkable, cutoff: float | None, on_read: Callable[[int], None]) -> Found:
    """Compare the file at the row's path with the row. Only a regular
    file is read (never a symlink, FIFO or directory: those are missing
    tarballs)."""
    pruned = retention.older(claim.received, cutoff)
    host = store.open_host(claim.host_id)
    if isinstance(host, Skipped) and host.unreadable:  # its files may be there: not missing, nor pruned
        return Found("unreadable", host.reason)
    if host is None or isinstance(host, Skipped):
        return (
            Found("pruned")
            if pruned
            else Found("missing", "no host directory" if host is None else host.reason)
        )
    with host:
        tarball = host.lstat(claim.episode_id)
        if isinstance(tarball, Skipped) and tarball.unreadable:  # there may be a file: not missing
            return Found("unreadable", tarball.reason)
        if tarball is None or isinstance(tarball, Skipped):
            if pruned:
                return Found("pruned")
            return Found(
                "missing", "no such file" if tarball is None else f"not a regular file: {tarball.reason}"
            )
        if tarball.size != claim.size:  # no need to read it: it differs
            return Found("mismatched", "size", size=tarball.size)
        try:
            fd = host.open(tarball)
        except (FileNotFoundError, NotRegularFile):
            return Found("unsettled", "removed or replaced before it was read")
        except OSError as e:
            return Found("unreadable", f"open: {e.strerror}")
        try:
            reader = HashingReader(fd, tarball.size, on_read=on_read)
            reader.drain()
            moved = host.moved(tarball)
        except OSError as e:
            return Found("unreadable", f"read: {e.strerror}")
        finally:
            os.close(fd)
        if moved is not None or reader.size != tarball.size:
            return Found("unsettled", moved or "changed while it was read")
    digest = reader.sha256.hexdigest()
    if digest != claim.sha256:
        return Found("mismatched", "sha256", sha256=digest, size=reader.size)
    return Found("ok", sha256=digest, size=reader.size)


def report(log: Logger, claim: Checkable, line: int, found: Found, n: int) -> None:
    """Log what one check found; the n-th of its kind this round past
    MAX_EVENTS is only counted (one events_suppressed says so)."""
    log.debug("tarball_scrubbed", path=claim.path, line=line, result=found.result)
    event = {
        "mismatched": "scrub_mismatch",
        "missing": "scrub_missing",
        "unreadable": "scrub_unreadable",
        "unsettled": "scrub_unsettled",
    }.get(found.result)
    if event is None:
        return
    if n > MAX_EVENTS:
        if n == MAX_EVENTS + 1:
            log.warning("events_suppressed", suppressed_event=event, after=MAX_EVENTS)
        return
    if found.result == "mismatched":
        facts: dict[str, object] = {
            "expected_sha256": claim.sha256,
            "actual_sha256": found.sha256,
            "expected_size": claim.size,
            "actual_size": found.size,
        }
    else:
        facts = {"reason": found.reason}
    level = "info" if found.result == "unsettled" else "warning"
    getattr(log, level)(event, path=claim.path, line=line, **facts)
