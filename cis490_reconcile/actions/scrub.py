"""`cis490-reconcile scrub`: one scrub run (scrub.py), then its outcome to the
sinks (outcome.py). Exit 0 when nothing wrong was found (even if stopped
early, also while it waited for a pass holding the state directory), 1 for a
mismatched, missing or unreadable tarball, or when the scrub could not run
(another scrub, a pass holding the state directory past lock_timeout while
the database needed making, the database busy past its timeout or on a full
disk, no index). A path on a network filesystem is a warning on stderr: a
scrub appends nothing to the index."""

from __future__ import annotations

from dataclasses import asdict

from .. import outcome, preflight, syscalls
from ..config import ConfigError
from ..notify import Notifier
from ..outcome import Outcome
from ..runtime import ExitCode, Signals
from ..scrub import Scrubber, ScrubNotRun, ScrubRun, ScrubStopped
from . import Context


def run(ctx: Context) -> ExitCode:
    cfg = ctx.cfg
    if cfg.host is not None:
        raise ConfigError("--host: a scrub walks the whole index; it cannot be limited to one host")
    if cfg.state_dir is None:
        raise ConfigError("scrub keeps its cursor in state_dir, which is not set")
    # one this user may not reach is the scrub's to fail on, in scrub_failed
    if (why := syscalls.not_a_directory(cfg.state_dir)) in syscalls.NO_DIRECTORY:
        raise ConfigError(f"scrub keeps its cursor in state_dir {cfg.state_dir}: {why}")
    # root's scrub.lock and database in the service user's state directory fail every later scrub
    preflight.check_user(cfg)
    preflight.warn_network_filesystems(cfg, ctx.stderr, "scrub")
    bar = ctx.bar("scrub")
    log = ctx.logger(cfg, bar=bar)
    with Signals(hangup_reloads=False) as signals:
        scrubber = Scrubber(cfg, log, Notifier(), signals.should_stop, ctx.args.max_duration, bar)
        try:
            done = scrubber.run()
        except ScrubStopped:  # before a row was read: no run to record
            return ExitCode.OK
        except ScrubNotRun:
            return ExitCode.FAILED
    result = _outcome(done)
    for sink in outcome.sinks(cfg, log):
        sink.write(result)
    return ExitCode.OK if result.result != "failed" else ExitCode.FAILED


def _outcome(done: ScrubRun) -> Outcome:
    """Failed when it stopped on an error or found a mismatched, missing or
    unreadable tarball; interrupted when stopped early; else ok."""
    counts = {
        "run": asdict(done.run),
        "in_round": asdict(done.in_round),
        "round": done.round,
        "last_round_completed_at": done.last_round_completed_at,
        "round_progress": done.round_progress,
        "round_completed": done.round_completed,
        "stopped_by": done.stopped_by,
    }
    failed = done.error or done.found_problems
    result = "failed" if failed else "interrupted" if done.stopped_by else "ok"
    return Outcome("scrub", done.started_at, done.duration_s, result, done.error, counts)
