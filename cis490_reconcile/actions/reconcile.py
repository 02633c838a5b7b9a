"""A reconcile pass: --once, or a loop of passes --interval apart.

Signals (runtime.Signals) only set flags. SIGTERM and SIGINT stop the pass at
its next checkpoint, then STOPPING=1 and exit 0. SIGHUP in a loop reloads the
config after the current pass (a bad new config is logged, the old one kept);
with --once it is a terminal's hangup, so it stops as above. The idle wait
between passes wakes at once on a signal, and every half watchdog period to
feed the watchdog. Each pass's outcome goes to the sinks (outcome.py), but
for one that gave up (or was stopped) waiting for another pass to release the
state directory: it did nothing, and must not replace what `status` and the
metrics say of that one.

A config with the index, lock file, episodes or state directory on a network
filesystem (preflight.network_filesystems) is refused, at start and on a
reload, unless allow_network_fs; a dry run takes no lock, so it only warns.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict

from .. import outcome, preflight
from ..config import Config, ConfigError
from ..log import Logger
from ..notify import Notifier
from ..outcome import Outcome
from ..reconcile import PassFailed, Reconciler
from ..runtime import ExitCode, Signals
from ..termbar import TerminalBar
from . import Context

MAX_JITTER_S = 30.0


def run(ctx: Context) -> ExitCode:
    args = ctx.args
    if not args.once and ctx.cfg.interval is None:
        raise ConfigError("nothing to do: pass --once for one pass, or --interval SECONDS for a loop")
    if not args.dry_run:
        preflight.check_user(ctx.cfg)
    return _Loop(ctx).run()


class _Loop:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.once = bool(ctx.args.once)
        self.notifier = Notifier()
        self.bar: TerminalBar | None = ctx.bar("reconcile") if self.once else None
        # a dry run prints its rows on stdout: its log goes to stderr
        self.log_stream = ctx.stderr if ctx.args.dry_run else ctx.stdout

    def _logger(self, cfg: Config) -> Logger:
        return self.ctx.logger(cfg, self.log_stream, self.bar)

    def _reconciler(self, cfg: Config, log: Logger, signals: Signals) -> Reconciler:
        args = self.ctx.args
        return Reconciler(
            cfg,
            log,
            self.notifier,
            signals.should_stop,
            dry_run=args.dry_run,
            rows_out=self.ctx.stdout,
            full=args.full,
            bar=self.bar,
        )

    def _sinks(self, cfg: Config, log: Logger) -> list[outcome.Sink]:
        """None for a dry run, after a reload too: its counts are rows it
        would append, and it writes nothing of ours."""
        return [] if self.ctx.args.dry_run else outcome.sinks(cfg, log)

    def _check_filesystems(self, cfg: Config, log: Logger) -> None:
        """Refuse a network filesystem (ConfigError) unless allowed or a dry
        run; when it runs anyway, the log says so."""
        problems = preflight.network_filesystems(cfg)
        if problems and not (cfg.allow_network_fs or self.ctx.args.dry_run):
            raise ConfigError(f"{problems[0]}; set allow_network_fs to run anyway")
        for problem in problems:
            log.warning("network_filesystem", problem=problem)

    def run(self) -> ExitCode:
        cfg = self.ctx.cfg
        log = self._logger(cfg)
        self._check_filesystems(cfg, log)
        passes, code = 0, ExitCode.OK
        with Signals(hangup_reloads=not self.once) as signals:
            reconciler = self._reconciler(cfg, log, signals)
            sinks = self._sinks(cfg, log)
            if not self.once:  # a --once run says all it has to say in pass_started/pass_finished
                log.info("service_started", interval_s=cfg.interval, pid=os.getpid())
            self.notifier.ready("started")
            try:
                while True:
                    passes += 1
                    code = self._pass(reconciler, sinks)
                    if self.once or signals.should_stop():
                        break
                    cfg, log, reconciler, sinks = self._idle(cfg, log, reconciler, sinks, signals)
                    if signals.should_stop():
                        break
            finally:
                reconciler.close()
            stopped_by = signals.stop_by
        if stopped_by:
            code = ExitCode.OK  # asked to stop: not a failure, whatever the last pass did
        if not self.once:
            log.info("service_stopped", passes=passes, signal=stopped_by, exit_code=int(code))
        self.notifier.stopping(f"stopped after {passes} pass(es)")
        return code

    def _pass(self, reconciler: Reconciler, sinks: list[outcome.Sink]) -> ExitCode:
        """One pass and its outcome; OK when it completed or was stopped."""
        started, clock = time.time(), time.monotonic()
        error = None
        try:
            summary = reconciler.run_pass()
        except PassFailed as e:
            summary, error = e.summary, str(e)
        if reconciler.turned_away:  # its last line says so; the record and metrics stay the running pass's
            return ExitCode.FAILED if error else ExitCode.OK
        result = "failed" if error else "interrupted" if summary.interrupted else "ok"
        counts: dict[str, object] = {**asdict(summary), "orphan_rows": reconciler.orphans}
        done = Outcome("pass", started, time.monotonic() - clock, result, error, counts)
        for sink in sinks:
            sink.write(done)
        return ExitCode.FAILED if error else ExitCode.OK

    def _idle(
        self, cfg: Config, log: Logger, reconciler: Reconciler, sinks: list[outcome.Sink], signals: Signals
    ) -> tuple[Config, Logger, Reconciler, list[outcome.Sink]]:
        """Wait out the interval (plus jitter), feeding the watchdog and
        handling reloads; what to run the next pass with."""
        last_end = time.monotonic()
        jitter = random.uniform(0, min((cfg.interval or 0) * 0.1, MAX_JITTER_S))
        while not signals.should_stop():
            if signals.reload:
                signals.reload = False
                new = self._reload(cfg, log)
                if new is not None:
                    cfg, log = new, self._logger(new)
                    reconciler.close()
                    reconciler, sinks = self._reconciler(cfg, log, signals), self._sinks(cfg, log)
            assert cfg.interval is not None  # loop mode needs one; a reload refuses to drop it
            remaining = last_end + cfg.interval + jitter - time.monotonic()
            if remaining <= 0:
                break
            self.notifier.status(f"idle, next pass in {remaining:.0f} s", force=True)
            # forced: the wait below is a half period, so a ping put off now would come up to a
            # whole period after the last one (a hair short of WatchdogSec, in the worst phase)
            self.notifier.keepalive(force=True)
            signals.wait(min(remaining, self.notifier.watchdog_interval_s or remaining))
        return cfg, log, reconciler, sinks

    def _reload(self, cfg: Config, log: Logger) -> Config | None:
        """The new config, or None to keep running the old one."""
        self.notifier.reloading()
        try:
            new = self.ctx.reload()
            if new.interval is None:
                raise ConfigError("interval is not set; a running loop keeps its interval")
            if not self.ctx.args.dry_run:
                preflight.check_user(new)  # as at start: another index may belong to someone else
            self._check_filesystems(new, log)
        except ConfigError as e:
            log.error("config_reload_failed", error=str(e), kept="the running configuration")
            self.notifier.ready("reload failed; running configuration kept")
            return None
        log.info("config_reloaded", changed=new != cfg, interval_s=new.interval)
        self.notifier.ready("configuration reloaded")
        return new if new != cfg else None
