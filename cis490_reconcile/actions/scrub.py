"""`cis490-reconcile scrub`: one scrub run (scrub.py), then its outcome to
the sinks (outcome.py). Exit 0 when nothing wrong was found (even if stopped
early), 1 for a mismatched, missing or unreadable tarball, or when the scrub
could not run. A path on a network filesystem is a warning on stderr: a
scrub appends nothing to the index."""

from __future__ import annotations

from .. import outcome, preflight
from ..config import ConfigError
from ..notify import Notifier
from ..runtime import ExitCode, Signals
from ..scrub import Scrubber
from . import Context


def run(ctx: Context) -> ExitCode:
    cfg = ctx.cfg
    if cfg.host is not None:
        raise ConfigError("--host: a scrub walks the whole index; it cannot be limited to one host")
    if cfg.state_dir is None or not cfg.state_dir.is_dir():
        raise ConfigError(f"scrub keeps its cursor in state_dir, which is not a directory: {cfg.state_dir}")
    for problem in preflight.network_filesystems(cfg):
        ctx.stderr.write(f"cis490-reconcile scrub: warning: {problem}\n")
    bar = ctx.bar("scrub")
    log = ctx.logger(cfg, bar=bar)
    with Signals(hangup_reloads=False) as signals:
        scrubber = Scrubber(cfg, log, Notifier(), signals.should_stop, ctx.args.max_duration, bar)
        code = scrubber.run()
    if scrubber.outcome is not None:
        for sink in outcome.sinks(cfg, log):
            sink.write(scrubber.outcome)
    return code
