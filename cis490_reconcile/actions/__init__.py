"""The subcommands, one module each, all of the same shape:

    run(ctx: Context) -> ExitCode

cli.py parses the flags and loads the config into a Context, then calls
the action's run; an action wires library modules together and never
imports another action. What every action may need comes with the context:
the config and where each value came from, its own flags, the streams, and
the factories for a logger and a terminal bar.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ..config import Config, Loaded
from ..log import Logger, make_logger
from ..termbar import TerminalBar, clearing, wanted


@dataclass
class Context:
    loaded: Loaded  # the effective config and where each value came from
    args: argparse.Namespace  # the action's own flags
    reload: Callable[[], Config]  # read the config again (SIGHUP in a loop); raises ConfigError
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    @property
    def cfg(self) -> Config:
        return self.loaded.config

    def bar(self, label: str) -> TerminalBar | None:
        """A progress bar on stderr, only for an operator at a terminal."""
        return TerminalBar(self.stderr, label) if wanted(self.stderr) else None

    def logger(self, cfg: Config, stream: TextIO | None = None, bar: TerminalBar | None = None) -> Logger:
        """JSON lines on `stream` (stdout), clearing the bar before each."""
        return make_logger(cfg.log_level, clearing(stream or self.stdout, bar))
