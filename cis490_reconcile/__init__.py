"""cis490-reconcile: backfill index.jsonl rows for episode tarballs the
receiver stored but never indexed.

For contributors, the data flow of a pass, from the top:

    cli.py              flags and config (config.py; preflight.py checks paths) -> actions/<command>.run(ctx)
    actions/reconcile   --once or a loop; each pass's outcome -> outcome.py sinks
    reconcile.py        Reconciler: what lasts between passes; opens the state (statedir.py)
    passrun.py          PassRun: one pass, and the one place a verdict is recorded
      coverage.py         the state database (state/) in step with index.jsonl (index.py)
      scan.py             which episodes the index lacks; memos of unchanged host directories
      store.py            the host directories, listed and opened safely
      verify.py           one read of one tarball (reading, zstdframe, tarstream; verdicts.py)
      workers.py          ... in forked processes
      commit.py           the only code that takes the index lock (lock.py, syscalls.py)

The other commands: actions/scrub -> scrub.py (its cursor: scrubcursor.py),
actions/status -> survey.py, actions/check -> check.py (verify.py on named
files); all read the state through the state/ package.

tests/README.md says what each test proves; README.md is for operators.
"""

__version__ = "0.2.0"
