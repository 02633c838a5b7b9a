"""The command line: parse the flags, load the config, call the action.

    cis490-reconcile --once [flags]        one pass (the timer's service)
    cis490-reconcile --interval S [flags]  a loop (or `interval` in the config)
    cis490-reconcile config [flags]        print the effective config and sources
    cis490-reconcile status [--json]       report, read-only
    cis490-reconcile check [--json] FILE.. verify named tarballs and look them up, read-only
    cis490-reconcile scrub [flags]         re-check indexed tarballs against their rows
    cis490-reconcile demo [--keep]         build a demo store with gaps, reconcile it

Every subcommand is an action, actions.<name>.run(ctx) -> ExitCode; nothing
here decides anything but which one. A bad flag, value or path is one line
on stderr and exit 2; a bug is an internal_error event and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__, config, preflight
from .basics import for_terminal
from .config import SETTINGS, ConfigError
from .runtime import ExitCode

PROG = "cis490-reconcile"
SUBCOMMANDS = {
    "config": "prints the effective configuration and where each value came from",
    "status": "reports what is unindexed, corrupt, missing or duplicated, changing nothing",
    "check": "verifies the tarballs named as a pass would and looks them up in the index, changing nothing",
    "scrub": "re-reads indexed tarballs and checks them against their rows",
    "demo": "builds a small store with gaps and reconciles it",
}
DESCRIPTIONS: dict[str | None, str] = {
    None: "Backfill index.jsonl rows for episode tarballs the receiver stored but never indexed.",
    **{c: d[0].upper() + d[1:] + "." for c, d in SUBCOMMANDS.items()},
}


def _seconds_arg(value: str) -> float:
    try:
        return config.positive_seconds(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# the flags of each action beyond the settings: (flag, help, argparse keywords)
OPTIONS: dict[str | None, tuple[tuple[str, str, dict[str, object]], ...]] = {
    None: (
        ("--once", "run one pass and exit (wins over --interval)", {"action": "store_true"}),
        (
            "--dry-run",
            "take no lock, write nothing; print the rows a pass would append on stdout (logs go to stderr)",
            {"action": "store_true"},
        ),
        (
            "--full",
            "list every host directory and read the whole index, whatever the state remembers",
            {"action": "store_true"},
        ),
    ),
    "status": (
        ("--json", "one JSON document (stable keys) instead of a table", {"action": "store_true"}),
        (
            "--all-orphans",
            "instead of the report, stream every row whose tarball is gone as JSON lines "
            "(host_id, episode_id, offset, kind: missing or pruned)",
            {"action": "store_true"},
        ),
    ),
    "check": (
        ("files", "episode tarballs (<episode_id>.tar.zst) to verify", {"nargs": "+", "metavar": "FILE"}),
        ("--json", "one JSON object per file, one per line, instead of text", {"action": "store_true"}),
    ),
    "scrub": (
        (
            "--max-duration",
            "stop after this long, saving the cursor; the next scrub resumes there (default: no limit)",
            {"type": _seconds_arg, "metavar": "SECONDS"},
        ),
    ),
    "config": (),
    "demo": (("--keep", "keep the demo directory", {"action": "store_true"}),),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not usage plus a line."""
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _parser(command: str | None) -> _Parser:
    """The flags of `command` (None: a pass); every subcommand but demo takes the settings."""
    parser = _Parser(
        prog=f"{PROG} {command}" if command else PROG,
        allow_abbrev=False,
        description=DESCRIPTIONS[command],
        epilog=None if command else "Subcommands: " + "; ".join(f"'{c}' {d}" for c, d in SUBCOMMANDS.items()),
    )
    for flag, text, extra in OPTIONS[command]:
        parser.add_argument(flag, help=text, **extra)  # type: ignore[arg-type]
    if command != "demo":
        parser.add_argument(
            "--config",
            type=_config_path,
            metavar="FILE",
            help=f"TOML config file (default: ${config.ENV_CONFIG}, else {config.DEFAULT_CONFIG_FILE})",
        )
        for s in SETTINGS:
            if s.is_switch:
                parser.add_argument(s.flag, action="store_true", default=None, help=s.help)
            else:
                shown = "" if s.default in (None, ()) else f" (default: {s.default})"
                parser.add_argument(s.flag, default=None, metavar=s.metavar, help=s.help + shown)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _config_path(text: str) -> Path:
    if not text:  # Path("") is ".", a directory: name a file instead
        raise argparse.ArgumentTypeError("an empty path; name a TOML file")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    from .actions import Context

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else None
    args = _parser(command).parse_args(argv[1:] if command else argv)
    flags = {s.key: getattr(args, s.key) for s in SETTINGS if getattr(args, s.key, None) is not None}

    def load() -> config.Config:
        loaded = config.load(flags, args.config, os.environ)
        preflight.check_paths(loaded.config)
        return loaded.config

    action = importlib.import_module(f".actions.{command or 'reconcile'}", __package__)
    try:
        if command == "demo":
            loaded = config.resolve([])
        else:
            loaded = config.load(flags, args.config, os.environ)
            if command not in ("config", "check"):  # check needs no store: it reads the files named
                preflight.check_paths(loaded.config)
        ctx = Context(loaded, args, load)
        return int(action.run(ctx))
    except ConfigError as e:
        print(for_terminal([f"{PROG}: error: {e}"]), end="", file=sys.stderr)  # one line, whatever it quotes
        return ExitCode.USAGE
    except Exception:
        from .log import make_logger

        make_logger("error", sys.stdout).exception("internal_error")
        return ExitCode.FAILED
    finally:
        from .log import say_lost  # already loaded by the action

        say_lost(sys.stderr)
