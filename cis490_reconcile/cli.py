"""The command line: parse flags, load the config, wire the pieces together,
turn the outcome into an exit code. No policy lives here.

    cis490-reconcile --once [flags]        one pass (the timer's service)
    cis490-reconcile --interval S [flags]  a loop (or `interval` in the config)
    cis490-reconcile config [flags]        print the effective config and sources
    cis490-reconcile status [--json]       report, read-only
    cis490-reconcile scrub [flags]         re-check indexed tarballs against their rows
    cis490-reconcile demo                  build a demo store with gaps, reconcile it

Exit codes: 0 the pass completed (even if it reported corrupt files) or was
stopped by a signal, 1 the pass could not complete, 2 bad flags, values or paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__, config, progress, syscalls
from .config import SETTINGS, Config, ConfigError
from .log import Logger, make_logger
from .notify import Notifier
from .progress import Progress
from .runtime import Signals
from .service import EXIT_FAILED, Service

EXIT_USAGE = 2
PROG = "cis490-reconcile"
SUBCOMMANDS = {
    "config": "prints the effective configuration and where each value came from",
    "status": "reports what is unindexed, corrupt, orphaned or duplicated, changing nothing",
    "scrub": "re-reads indexed tarballs and checks them against their rows",
    "demo": "builds a small store with gaps and reconciles it",
}
DESCRIPTIONS = {
    None: "Backfill index.jsonl rows for episode tarballs the receiver stored but never indexed.",
    **{c: d[0].upper() + d[1:] + "." for c, d in SUBCOMMANDS.items()},
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not usage plus a line."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser(command: str | None) -> _Parser:
    """The flags of `command` (None: a pass); every subcommand takes the settings."""
    parser = _Parser(
        prog=f"{PROG} {command}" if command else PROG,
        allow_abbrev=False,
        description=DESCRIPTIONS[command],
        epilog=None if command else "Subcommands: " + "; ".join(f"'{c}' {d}" for c, d in SUBCOMMANDS.items()),
    )
    if command is None:
        parser.add_argument(
            "--once", action="store_true", help="run one pass and exit (wins over --interval)"
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="take no lock, write nothing; print the rows a pass would append on stdout "
            "(logs go to stderr)",
        )
        parser.add_argument(
            "--full",
            action="store_true",
            help="list every host directory and parse the whole index, whatever the state remembers",
        )
    elif command == "status":
        parser.add_argument(
            "--json", action="store_true", help="one JSON document (stable keys) instead of a table"
        )
        parser.add_argument(
            "--all-orphans",
            action="store_true",
            help="instead of the report, stream every row whose tarball is gone as JSON lines "
            "(host_id, episode_id, offset, kind: missing or pruned)",
        )
    elif command == "scrub":
        parser.add_argument(
            "--max-duration",
            type=_seconds_arg,
            metavar="SECONDS",
            help="stop after this long, saving the cursor; the next scrub resumes there (default: no limit)",
        )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"TOML config file (default: ${config.ENV_CONFIG} or {config.DEFAULT_CONFIG_FILE}, if present)",
    )
    for s in SETTINGS:
        if s.is_switch:
            parser.add_argument(s.flag, action="store_true", default=None, help=s.help)
        else:
            shown = "" if s.default is None else f" (default: {s.default})"
            parser.add_argument(s.flag, default=None, metavar=s.metavar, help=s.help + shown)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _seconds_arg(value: str) -> float:
    try:
        return config.positive_seconds(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _progress(label: str) -> Progress | None:
    return Progress(sys.stderr, label) if progress.wanted(sys.stderr) else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else None
    if command == "demo":
        from . import demo  # not imported for a pass: it costs start-up time

        return demo.main(argv[1:])
    parser = _parser(command)
    args = parser.parse_args(argv[1:] if command else argv)
    flags = {s.key: getattr(args, s.key) for s in SETTINGS if getattr(args, s.key) is not None}

    def load() -> Config:
        cfg = config.load(flags, args.config, os.environ).config
        config.check_paths(cfg)
        return cfg

    try:
        if command == "config":
            print(config.render(config.load(flags, args.config, os.environ)), end="")
            return 0
        cfg = load()
        if command == "status":
            from . import status

            bar = None if args.all_orphans else _progress("status")
            return status.main(cfg, sys.stdout, args.json, bar, all_orphans=args.all_orphans)
        if command == "scrub":
            if args.host is not None:  # the cursor is one for the whole index
                parser.error("--host: a scrub walks the whole index; it cannot be limited to one host")
            return _scrub(cfg, args.max_duration)
        if not args.once and cfg.interval is None:
            parser.error("nothing to do: pass --once for one pass, or --interval SECONDS for a loop")
        if not args.dry_run:
            config.check_user(cfg)
    except ConfigError as e:
        return _fail(str(e))

    bar = _progress("reconcile") if args.once else None
    stream = sys.stderr if args.dry_run else sys.stdout

    def logger_for(c: Config) -> Logger:
        return make_logger(c.log_level, progress.clearing(stream, bar))

    service = Service(
        load, logger_for, Notifier(), once=args.once, dry_run=args.dry_run, full=args.full, progress=bar
    )
    try:
        return service.run(cfg)
    except Exception:
        logger_for(cfg).exception("internal_error")
        return EXIT_FAILED


def _scrub(cfg: Config, max_duration: float | None) -> int:
    from . import scrub

    if cfg.state_dir is None or not cfg.state_dir.is_dir():
        raise ConfigError(f"scrub keeps its cursor in state_dir, which is not a directory: {cfg.state_dir}")
    bar = _progress("scrub")
    log = make_logger(cfg.log_level, progress.clearing(sys.stdout, bar))
    notifier = Notifier()
    try:
        with Signals(hangup_reloads=False) as signals:
            scrubber = scrub.Scrubber(cfg, log, notifier, signals.should_stop, max_duration, bar)
            code = scrubber.run()
        if cfg.metrics_file is not None and scrubber.outcome is not None:
            from . import metrics

            path = scrub.metrics_path(cfg.metrics_file)
            try:
                syscalls.write_atomic(path, metrics.render_scrub(scrubber.outcome))
            except OSError as e:
                log.warning("metrics_write_failed", metrics_file=path, error=e.strerror or str(e))
        return code
    except Exception:
        log.exception("internal_error")
        return EXIT_FAILED
