"""Running passes: once, or in a loop, with signals and systemd notifications.

Signals (runtime.Signals) only set flags. SIGTERM and SIGINT stop the pass at
its next checkpoint, then STOPPING=1 and exit 0. SIGHUP in loop mode reloads
the config after the current pass (a bad new config is logged and the old one
kept); with --once it is a hangup of the terminal, so it stops as above. The
idle wait between passes wakes at once on a signal, and every half watchdog
period to ping.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from .config import Config, ConfigError
from .log import Logger
from .notify import Notifier
from .passrun import PassSummary
from .progress import Progress
from .reconcile import PassFailed, Reconciler
from .runtime import Signals

EXIT_OK, EXIT_FAILED = 0, 1
MAX_JITTER_S = 30.0


@dataclass
class Service:
    """Wires a config source, a logger and the notifier to a Reconciler."""

    load_config: Callable[[], Config]  # raises ConfigError
    make_logger: Callable[[Config], Logger]
    notifier: Notifier
    once: bool
    dry_run: bool = False
    full: bool = False
    rows_out: TextIO | None = None
    progress: Progress | None = None
    _carried: dict[str, float] | None = field(default=None, init=False)  # see metrics.CARRIED

    def run(self, cfg: Config) -> int:
        log = self.make_logger(cfg)
        passes = 0
        code = EXIT_OK
        with Signals(hangup_reloads=not self.once) as signals:
            reconciler = self._reconciler(cfg, log, signals)
            if not self.once:  # a --once run says all it has to say in pass_started/pass_finished
                log.info("service_started", interval_s=cfg.interval, pid=os.getpid())
            self.notifier.ready("started")
            try:
                while True:
                    passes += 1
                    code = EXIT_OK if self._pass(cfg, log, reconciler) else EXIT_FAILED
                    if self.once or signals.should_stop():
                        break
                    cfg, log, reconciler = self._idle(cfg, log, reconciler, signals)
                    if signals.should_stop():
                        break
            finally:
                reconciler.close()
            stopped_by = signals.stop_by
        if stopped_by:
            code = EXIT_OK  # asked to stop: not a failure, whatever the last pass did
        if not self.once:
            log.info("service_stopped", passes=passes, signal=stopped_by, exit_code=code)
        self.notifier.stopping(f"stopped after {passes} pass(es)")
        return code

    def _pass(self, cfg: Config, log: Logger, reconciler: Reconciler) -> bool:
        """One pass, then its metrics and its record for `status`. True
        when it completed or was stopped."""
        started, clock = time.time(), time.monotonic()
        error = None
        try:
            summary = reconciler.run_pass()
            ok = not summary.interrupted
        except PassFailed as e:
            summary, ok, error = e.summary, False, str(e)
        if not self.dry_run and cfg.metrics_file is not None:
            self._write_metrics(cfg.metrics_file, log, reconciler, summary, ok, started, clock)
        return error is None

    def _write_metrics(
        self,
        path: Path,
        log: Logger,
        reconciler: Reconciler,
        summary: PassSummary,
        ok: bool,
        started: float,
        clock: float,
    ) -> None:
        from . import metrics  # prometheus_client costs 23 ms of start-up: only when asked for

        if self._carried is None:
            self._carried = metrics.carried_forward(path)
        if ok:
            self._carried["last_success_timestamp_seconds"] = started
        counts = {k: float(v) for k, v in asdict(summary).items() if isinstance(v, int | float)}
        facts = metrics.RunFacts(started, time.monotonic() - clock, ok, counts, reconciler.orphans)
        try:
            metrics.write(path, facts, self._carried.get("last_success_timestamp_seconds"))
        except OSError as e:
            log.warning("metrics_write_failed", metrics_file=path, error=e.strerror or str(e))

    def _reconciler(self, cfg: Config, log: Logger, signals: Signals) -> Reconciler:
        return Reconciler(
            cfg,
            log,
            self.notifier,
            signals.should_stop,
            dry_run=self.dry_run,
            rows_out=self.rows_out,
            full=self.full,
            bar=self.progress,
        )

    def _idle(
        self, cfg: Config, log: Logger, reconciler: Reconciler, signals: Signals
    ) -> tuple[Config, Logger, Reconciler]:
        """Wait out the interval (plus jitter), pinging the watchdog and
        handling reloads. Returns the config, logger and reconciler to use next."""
        last_end = time.monotonic()
        jitter = random.uniform(0, min((cfg.interval or 0) * 0.1, MAX_JITTER_S))
        while not signals.should_stop():
            if signals.reload:
                signals.reload = False
                cfg, log, reconciler = self._reload(cfg, log, reconciler, signals)
            assert cfg.interval is not None  # loop mode needs one; reload refuses to drop it
            remaining = last_end + cfg.interval + jitter - time.monotonic()
            if remaining <= 0:
                break
            self.notifier.status(f"idle, next pass in {remaining:.0f} s", force=True)
            self.notifier.keepalive()
            signals.wait(min(remaining, self.notifier.watchdog_interval_s or remaining))
        return cfg, log, reconciler

    def _reload(
        self, cfg: Config, log: Logger, reconciler: Reconciler, signals: Signals
    ) -> tuple[Config, Logger, Reconciler]:
        self.notifier.reloading()
        try:
            new = self.load_config()
            if new.interval is None:
                raise ConfigError("interval is not set; a running loop keeps its interval")
        except ConfigError as e:
            log.error("config_reload_failed", error=str(e), kept="the running configuration")
            self.notifier.ready("reload failed; running configuration kept")
            return cfg, log, reconciler
        if new != cfg:
            log = self.make_logger(new)
            reconciler.close()
            reconciler = self._reconciler(new, log, signals)
        log.info("config_reloaded", changed=new != cfg, interval_s=new.interval)
        self.notifier.ready("configuration reloaded")
        return new, log, reconciler
