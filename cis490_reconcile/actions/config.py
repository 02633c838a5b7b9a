"""`cis490-reconcile config`: the effective configuration as TOML (itself a
valid config file), each key with where its value came from."""

from __future__ import annotations

from .. import config
from ..runtime import ExitCode
from . import Context


def run(ctx: Context) -> ExitCode:
    ctx.stdout.write(config.render(ctx.loaded))
    return ExitCode.OK
