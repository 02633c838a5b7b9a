"""cis490-reconcile: backfill index.jsonl rows for episode tarballs the
receiver stored but never indexed.

For contributors, the data flow of a pass, from the top:

    cli.py              flags and config (config.py; preflight.py checks paths) -> actions/<command>.run(ctx)
    actions/reconcile   --once or a loop; each pass's outcome -> outcome.py sinks
    reconcile.py        Reconciler: what lasts between passes; opens the state (statedir.py)
    passrun.py          PassRun: one pass, and the one place a verdict is recorded
      coverage.py         the state database (state/) in step with index.jsonl (index.py, rows.py)
      scan.py             which episodes the index lacks; memos of unchanged host directories
      store.py            the host directories, listed and opened safely
      verify.py           one read of one tarball (reading, zstdframe, tarstream; verdicts.py)
      workers.py          ... in forked processes
      commit.py           the only code that takes the index lock (lock.py, syscalls.py)

The other commands: actions/scrub -> scrub.py (its cursor: scrubcursor.py),
actions/status -> survey.py, actions/check -> check.py (verify.py on named
files); all read the state through the state/ package.

Records that never change once made (a Tarball, a verdict, a checkpoint)
are typing.NamedTuple; dataclasses are for what changes (counters, caches)
and for Config, whose fields carry metadata. A frozen dataclass execs the
code it generates at import: 23 of them were 49M of the 556M instructions a
no-op pass ran (`valgrind --tool=callgrind python -m cis490_reconcile
--once ...`), and start-up is most of what a quiet pass costs.

tests/README.md says what each test proves; README.md is for operators.
"""

__version__ = "0.2.0"
