"""`cis490-reconcile check FILE...`: one answer per tarball (check.py), as
text or, with --json, one JSON object per line.

Exit 0 when every file is intact and each indexed one matches its row; 1
when any file is damaged or differs from its row; 3 when nothing is damaged
but some file could not be decided (unverifiable, unreadable, changed while
it was read, or the check was stopped) or is one a pass passes over (a
dot-name, lost+found, an unsafe name: it never gets a row); 2 for a bad flag, value or path; 1
with one line on stderr when the index or the store could not be read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import preflight
from ..basics import for_terminal, human_duration, human_size
from ..check import Answer, Checker
from ..config import ConfigError
from ..runtime import ExitCode, Signals, StopRequested
from ..store import SUFFIX, printable
from . import Context


def run(ctx: Context) -> ExitCode:
    paths = [Path(p) for p in ctx.args.files]
    for path in paths:
        if not path.name.endswith(SUFFIX):
            raise ConfigError(f"check {path}: not an episode tarball (<episode_id>{SUFFIX})")
    preflight.warn_network_filesystems(ctx.cfg, ctx.stderr, "check")
    answers: list[Answer] = []
    stopped = False
    with Signals(hangup_reloads=False) as signals:

        def checkpoint() -> None:
            if signals.should_stop():
                raise StopRequested

        checker = Checker(ctx.cfg, ctx.logger(ctx.cfg, ctx.stderr), checkpoint)
        try:
            for path in paths:
                answer = checker.check(path)
                answers.append(answer)
                ctx.stdout.write(json.dumps(answer.to_json()) + "\n" if ctx.args.json else render(answer))
                ctx.stdout.flush()
        except StopRequested:  # the files left are undecided; one found damaged still wins
            ctx.stderr.write(f"cis490-reconcile check: stopped by {signals.stop_by}\n")
            stopped = True
        except OSError as e:  # the index (or the store) could not be read: said as status says it
            where = e.filename or ctx.cfg.index
            ctx.stderr.write(f"cis490-reconcile check: error: {where}: {e.strerror or e}\n")
            return ExitCode.FAILED
        finally:
            checker.close()
    if any(a.damaged for a in answers):
        return ExitCode.FAILED
    return ExitCode.UNDECIDED if stopped or any(a.undecided for a in answers) else ExitCode.OK


def render(a: Answer) -> str:
    """The answer for one file, as an operator reads it."""
    out = [f"{printable(a.path)}: {a.verdict}" + (f": {a.reason}" if a.reason else "")]
    seen = a.seen
    if seen is not None:
        size = f"{seen.size} bytes" + (f" ({human_size(seen.size)})" if seen.size >= 1024 else "")
        zstd = f"{seen.frames} complete frame{'s' * (seen.frames != 1)}"
        if seen.max_window:
            zstd += f", largest window {human_size(seen.max_window)}"
        if seen.frames:
            zstd += ", every frame checksummed" if seen.checksummed else ", not every frame checksummed"
        out += [f"  size      {size}", f"  sha256    {seen.sha256}", f"  zstd      {zstd}"]
    if a.verdict == "intact":
        out.append(f"  commit    {a.commit or 'none: ' + str(a.commit_note)}")
    if a.age_s is not None:
        age = f"  changed   {human_duration(a.age_s)} ago"
        if a.in_flight:
            age += f", younger than min_age ({a.min_age_s:g} s): a pass would wait for it"
        out.append(age)
    out.append(f"  index     {_lookup(a)}")
    if a.row is not None:
        out.append(f"  row       {_row(a)}")
    return for_terminal(out)


def _row(a: Answer) -> str:
    assert a.row is not None
    if a.lookup is not None and a.lookup.found != "not indexed":
        return "none appended: the index has one"
    when = "" if a.under_root else ", were it in the store"
    when += ", once settled" if a.in_flight else ""
    return f"a pass would append{when}: {a.row.decode('ascii').rstrip()}"


def _lookup(a: Answer) -> str:
    lookup = a.lookup
    if a.passed is not None:
        return f"not looked up: a pass skips this file, it is never indexed: {a.passed}"
    if lookup is None:
        return "not looked up: the file is not <episodes_root>/<host_id>/<episode_id>.tar.zst"
    if lookup.found == "not indexed":
        return "not indexed"
    text = f"indexed (row at byte {lookup.offset}), {lookup.found}"
    for key, (row, file) in lookup.differences.items():
        text += f"\n            {key}: row {json.dumps(row)}, file {json.dumps(file)}"
    return text
