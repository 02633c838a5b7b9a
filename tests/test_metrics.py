"""--metrics-file: a Prometheus textfile that parses, and stays valid (with
the last success carried forward) when a pass fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import LockHolder, Receiver, episode, gnu_tarball
from prometheus_client.parser import text_string_to_metric_families
from prometheus_stack import Daemon, binary, http_get, missing_binaries, start_on_free_port


def samples(path: Path) -> dict[str, float]:
    """name{labels} -> value; fails on anything the parser rejects."""
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            assert s.timestamp is None  # the textfile collector wants none
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def helps(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("# HELP")]


def test_metrics_after_a_pass_and_after_a_failed_one(receiver: Receiver, tmp_path: Path) -> None:
    receiver.tarball("h1", "a")
    receiver.tarball("h1", "b")
    receiver.tarball("h1", "cut", blob=receiver.tarball("h1", "c").read_bytes()[:-9])
    gnu_tarball(receiver.episodes / "h1/long.tar.zst", episode(), ("--long=31",))  # unverifiable
    receiver.append_row({"host_id": "h1", "episode_id": "gone", "schema_version": 1})  # an orphan row
    receiver.append_raw(b"garbage\n")
    prom = tmp_path / "cis490_reconcile.prom"
    state = tmp_path / "state"
    state.mkdir()

    ok = receiver.run("--metrics-file", str(prom), "--state-dir", str(state))
    assert ok.returncode == 0
    first = samples(prom)
    assert first["cis490_reconcile_last_run_success"] == 1
    assert first["cis490_reconcile_last_run_rows_backfilled"] == 3
    assert first["cis490_reconcile_last_run_tarballs{state=corrupt}"] == 1
    assert first["cis490_reconcile_last_run_tarballs{state=unverifiable}"] == 1
    assert first["cis490_reconcile_last_run_tarballs{state=scanned}"] == 5
    assert first["cis490_reconcile_index_bad_lines"] == 1
    assert first["cis490_reconcile_orphan_rows{kind=missing}"] == 1
    assert first["cis490_reconcile_orphan_rows{kind=pruned}"] == 0
    assert first["cis490_reconcile_last_run_bytes_read"] > 0
    assert (
        first["cis490_reconcile_last_success_timestamp_seconds"]
        == first["cis490_reconcile_last_run_timestamp_seconds"]
    )
    assert any(k.startswith("cis490_reconcile_build_info{") for k in first)
    first_help = helps(prom)

    receiver.tarball("h2", "new")
    with LockHolder(receiver.index):
        failed = receiver.run("--metrics-file", str(prom), "--lock-timeout", "0.3", "--state-dir", str(state))
    assert failed.returncode == 1
    second = samples(prom)  # still parses
    assert second["cis490_reconcile_last_run_success"] == 0
    assert second["cis490_reconcile_orphan_rows{kind=missing}"] == 1  # from the state of the last full pass
    assert second["cis490_reconcile_last_run_lock_wait_seconds"] >= 0.3  # a timeout is a wait too
    assert (
        second["cis490_reconcile_last_success_timestamp_seconds"]
        == first["cis490_reconcile_last_success_timestamp_seconds"]
    )
    assert (
        second["cis490_reconcile_last_run_timestamp_seconds"]
        > first["cis490_reconcile_last_run_timestamp_seconds"]
    )
    assert helps(prom) == first_help and len(first_help) >= 10  # constant HELP strings
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    third = receiver.run("--metrics-file", str(prom), "--state-dir", str(state))
    assert third.returncode == 0
    assert (
        samples(prom)["cis490_reconcile_last_success_timestamp_seconds"]
        > first["cis490_reconcile_last_success_timestamp_seconds"]
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run node_exporter as another user")
@pytest.mark.skipif(
    missing_binaries("node_exporter") is not None, reason=str(missing_binaries("node_exporter"))
)
def test_node_exporter_running_as_its_own_user_reads_the_files(receiver: Receiver, tmp_path: Path) -> None:
    """Debian's node_exporter runs as user prometheus, which is neither the
    service's user nor in its group, and the units set UMask=0027: files
    made 0640 were unreadable to it (node_textfile_scrape_error 1, every
    series absent). Metrics are no secret: they are world-readable."""
    receiver.tarball("h1", "a")
    state = tmp_path / "state"
    state.mkdir()
    textfiles = Path(tempfile.mkdtemp(dir="/var/tmp"))  # a directory the other user can search
    try:
        textfiles.chmod(0o755)
        prom = textfiles / "cis490_reconcile.prom"
        for argv in (
            receiver.argv("--once", "--metrics-file", str(prom), "--state-dir", str(state)),
            receiver.argv("--metrics-file", str(prom), "--state-dir", str(state), command="scrub"),
        ):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, umask=0o027)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        exporter = binary("node_exporter")
        assert exporter is not None
        daemon = Daemon("node_exporter", tmp_path / "node_exporter.log")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        port = start_on_free_port(
            daemon,
            lambda port: [
                *as_nobody,
                exporter,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textfiles}",
            ],
            lambda port: f"http://127.0.0.1:{port}/metrics",
        )
        try:
            scraped = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(textfiles)
    assert "node_textfile_scrape_error 0" in scraped, daemon.log_tail()
    assert "cis490_reconcile_last_run_success 1" in scraped
    assert "cis490_reconcile_scrub_round 1" in scraped


def test_a_symlink_planted_at_the_metrics_temp_name_is_not_followed(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The textfile is written to a temp name in its directory (node_exporter's,
    where others may write), then renamed. That name is predictable: one
    planted there as a symlink to the index used to have the index truncated
    and overwritten with metrics."""
    receiver.tarball("h1", "a")
    receiver.append_row(receiver.receiver_row("h1", "a"))
    index = receiver.index.read_bytes()
    prom = tmp_path / "textfiles" / "cis490_reconcile.prom"
    prom.parent.mkdir()
    env = {**os.environ, "CIS490_TEST_PAUSE_AT": "caught_up"}
    argv = receiver.argv("--once", "--metrics-file", str(prom))
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None and "paused at caught_up" in proc.stderr.readline()
    (prom.parent / f".{prom.name}.{proc.pid}.tmp").symlink_to(receiver.index)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert receiver.index.read_bytes() == index
    assert not prom.is_symlink() and "cis490_reconcile_last_run_success 1.0" in prom.read_text()
