"""Every event the program logs: its name, its level, what it means.

README's events reference is generated from this table, and
tests/test_readme.py fails when an event is logged that is not here, or
listed here and logged nowhere. Names are stable: scripts and alerts match
on them. Facts ride along as fields (see the README for examples).
"""

from __future__ import annotations

# name: (level, when it is logged, and its fields)
EVENTS: dict[str, tuple[str, str]] = {
    # a pass
    "pass_started": ("info", "`episodes_root`, `index`, `host`, `min_age_s`, `max_read_rate`, `dry_run`"),
    "pass_finished": (
        "info",
        "the summary: `dry_run`, `scanned`, `already_indexed`, `backfilled`, `raced`, `corrupt`, "
        "`unverifiable`, `quarantined`, `in_flight`, `unsettled`, `unreadable`, `skipped`, "
        "`bad_index_lines`, `bytes_read`, `lock_wait_s`, `lock_held_max_s`, `duration_s`, `interrupted`, "
        "`full`, `hosts_listed`, `hosts_unchanged`",
    ),
    "pass_failed": ("error", "the pass could not complete: `error`, and the counts so far; exit 1"),
    "network_filesystem": (
        "warning",
        "a path is on a network filesystem and the pass runs anyway (`allow_network_fs`, or a `--dry-run`, "
        "which takes no lock): `problem`, the line a pass would refuse with",
    ),
    "index_bad_line": ("warning", "a line that is not a row: `line`, `offset`, `reason` (scrub: debug)"),
    "index_torn_tail": ("warning", "the index ends inside a line: `offset`, `line` (scrub: debug)"),
    "index_torn_tail_terminated": ("info", 'we ended the torn last line with "\\n" before appending'),
    "index_restarted": ("warning", "the index was replaced or shrank: read again from the start"),
    "index_lock_waiting": ("info", "the index lock is busy: `lock_file`"),
    "index_appended": ("info", "a commit: `rows`, `bytes`, `lock_wait_s`, `lock_held_s`"),
    "row_backfilled": (
        "info",
        "one per row appended: `path`, `host_id`, `episode_id`, `sha256`, `size_bytes`, `commit`, "
        "`zstd_checksum`",
    ),
    "row_would_backfill": ("info", "the same, in a `--dry-run`"),
    "row_already_present": ("info", "the receiver's row arrived while we verified: `path`"),
    "rows_left_for_next_pass": ("info", "stopping with verified rows and the lock busy: `rows`"),
    "store_entry_skipped": ("warning", "never opened: `path`, `reason` (symlink, fifo, unsafe name, ...)"),
    "host_not_found": ("warning", "`--host` names no directory: `host_id`"),
    "tarball_in_flight": ("debug", "younger than `min_age`: `path`, `age_s`"),
    "tarball_corrupt": (
        "warning",
        "damaged bytes: `path`, `reason`, `size_bytes`; `quarantine_in_s` while the quarantine waits",
    ),
    "tarball_unverifiable": ("warning", "cannot be checked here: `path`, `reason`, `size_bytes` (once)"),
    "tarball_unverifiable_unchanged": ("debug", "still the file found unverifiable: not read again"),
    "tarball_unsettled": ("info", "changed, replaced or removed while it was read: `path`, `reason`"),
    "tarball_unreadable": ("warning", "open or read failed (EACCES, EIO): `path`, `reason`"),
    "tarball_without_commit": ("warning", "indexed without `commit`: `path`, `reason`"),
    "tarball_quarantined": (
        "warning",
        "moved aside: `path`, `quarantine_path`, `reason`; `error` if the move is not checked or not durable",
    ),
    "quarantine_failed": (
        "warning",
        "could not move it; it stays in place, or `error` says where: `path`, `error`",
    ),
    "memory_limited": (
        "warning",
        "the memory limit (MemoryMax=) made the pass use fewer workers or a smaller window limit: "
        "`workers`, `max_window`, `limit`",
    ),
    "events_suppressed": ("warning", "`after` events of kind `suppressed_event` this pass (or scrub round)"),
    # the state
    "state_rebuilt": ("warning", "the state database was unusable (`reason`): rebuilt by a full pass"),
    "state_ignored": ("info", "status or a dry run could not use the state database: `reason`"),
    "state_dir_unusable": ("warning", "the state directory cannot be written (`reason`): a temporary one"),
    "state_file_removed": ("info", "a state file of an earlier version was removed: `path`"),
    "state_record_failed": ("warning", "the last run's record could not be saved: `error`"),
    "metrics_write_failed": ("warning", "the metrics file could not be written: `metrics_file`, `error`"),
    # the loop
    "service_started": ("info", "loop mode: `interval_s`, `pid`"),
    "service_stopped": ("info", "loop mode: `passes`, `signal`, `exit_code`"),
    "config_reloaded": ("info", "after SIGHUP in loop mode: `changed`, `interval_s`"),
    "config_reload_failed": ("error", "after SIGHUP: the new config is bad (`error`); the old one runs on"),
    "internal_error": ("error", "a bug: the traceback in `exception`; exit 1"),
    # scrub
    "scrub_started": ("info", "`round`, `offset`, `line` of the cursor, `index_size`, `max_duration_s`"),
    "scrub_mismatch": (
        "warning",
        "`path`, `line`, `expected_sha256`, `actual_sha256` (null when the sizes differ), `expected_size`, "
        "`actual_size`",
    ),
    "scrub_missing": (
        "warning",
        "the tarball is gone (and not pruned by `retention`): `path`, `line`, `reason`",
    ),
    "scrub_unreadable": ("warning", "open or read failed: `path`, `line`, `reason`"),
    "scrub_unsettled": ("info", "changed, replaced or removed while it was read: `path`, `line`, `reason`"),
    "scrub_round_restarted": ("warning", "the cursor no longer fits the index (`reason`): a new round"),
    "scrub_round_completed": ("info", "`round`, `duration_s` (across runs), the round's counts"),
    "scrub_finished": (
        "info",
        "this run's `checked`, `ok`, `mismatched`, `missing`, `pruned`, `unsettled`, `unreadable`, "
        "`unverifiable`, `bad_lines`, `bytes_read`, `duration_s`, `round`, `round_completed`, `stopped_by`; "
        "`pruned_unread`: of the pruned, rows of runs found pruned before, counted without reading them",
    ),
    "scrub_stopped": (
        "info",
        "stopped (`stopped_by`) while a pass held the `state_dir` it had to settle, before a row was read; "
        "exit 0",
    ),
    "scrub_already_running": ("error", "another scrub holds `lock_file` (`<state_dir>/scrub.lock`); exit 1"),
    "scrub_failed": (
        "error",
        "the index could not be read, the store vanished, or the state database was busy past its "
        "timeout: `error`; exit 1",
    ),
    "scrub_cursor_ignored": ("warning", "the saved cursor is malformed (`reason`): a new round"),
    "scrub_cursor_save_failed": ("warning", "the cursor could not be saved: `error`"),
    "tarball_scrubbed": ("debug", "one per row: `path`, `line`, `result`"),
    "row_unverifiable": ("debug", "a row scrub cannot check (no host_id, no sha256...): `line`, `reason`"),
}
