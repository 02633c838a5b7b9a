"""The command line: parse flags, build the config, wire the pieces together,
turn the outcome into an exit code. No policy lives here.

Exit codes: 0 the pass completed (even if it reported corrupt files),
1 the pass could not complete, 2 bad flags, values or paths.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from . import __version__, config, demo
from .config import SETTINGS, ConfigError
from .log import make_logger
from .reconcile import PassFailed, Reconciler

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "cis490-reconcile"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not usage plus a line."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Backfill index.jsonl rows for episode tarballs the receiver stored but never indexed.",
        epilog="Subcommands: 'cis490-reconcile demo' builds a small store with gaps and reconciles it.",
    )
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="take no lock, write nothing; print the rows a pass would append on stdout (logs go to stderr)",
    )
    for s in SETTINGS:
        if s.is_switch:
            parser.add_argument(s.flag, action="store_true", default=None, help=s.help)
        else:
            shown = "" if s.default is None else f" (default: {s.default})"
            parser.add_argument(s.flag, default=None, metavar=s.metavar, help=s.help + shown)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        return demo.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.once:
        parser.error("nothing to do: pass --once to run one pass")
    try:
        given = {s.key: getattr(args, s.key) for s in SETTINGS}
        cfg = config.build({key: value for key, value in given.items() if value is not None})
        config.check_paths(cfg)
        if not args.dry_run:
            config.check_user(cfg)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    log = make_logger(cfg.log_level, sys.stderr if args.dry_run else sys.stdout)
    try:
        Reconciler(cfg, log, dry_run=args.dry_run).run_pass()
    except PassFailed:
        return EXIT_FAILED
    except Exception:
        log.exception("internal_error")
        return EXIT_FAILED
    return EXIT_OK
