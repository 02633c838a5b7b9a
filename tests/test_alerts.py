"""The shipped Prometheus alert rules (cis490_reconcile/prometheus/alerts.yml).

promtool proves the rules valid and their unit tests
(tests/prometheus/alerts_test.yml) prove, with the shipped thresholds and
for: durations in simulated time, that each alert fires when it should and
stays silent in the healthy and near-miss cases. The end-to-end test proves
the rest with the real components: real passes and a real scrub of the
product write their textfiles, a real node_exporter serves them, and a real
Prometheus evaluates a copy of the rules whose for: durations are divided by
FACTOR (shorten_for; expressions unchanged), so a scenario takes seconds.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import LockHolder, Receiver, Result, parse_events
from prometheus_client.parser import text_string_to_metric_families
from prometheus_stack import (
    ALERTS,
    ALERTS_TEST,
    PrometheusStack,
    binary,
    missing_binaries,
    rule_durations,
    shorten_for,
    wait_until,
)

# e2e: every for: divided by this: 30 min -> 1 s, 90 min -> 3 s, 10 min -> 333 ms
FACTOR = 1800
SEVERITIES = {"critical", "warning"}
ANNOTATIONS = {"summary", "description", "runbook_url"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool, or skip the test when it is not installed."""
    reason = missing_binaries("promtool")
    if reason:
        pytest.skip(reason)
    tool = binary("promtool")
    assert tool is not None
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


# --- the rules themselves -------------------------------------------------------


def test_promtool_check_rules_accepts_the_shipped_file() -> None:
    """What an operator runs after copying the file (README "Alerts")."""
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_durations(ALERTS.read_text()))} rules found" in proc.stdout


def test_promtool_unit_tests_pass_with_the_shipped_durations() -> None:
    """The shipped thresholds and for: durations, in simulated time (the
    test file names the rules relative to itself)."""
    proc = promtool("test", "rules", str(ALERTS_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    """A rule nobody proved firing, or proved silent, is not done: compare
    the alert names in the rules with those the promtool tests assert."""
    names = set(rule_durations(ALERTS.read_text()))
    tests = ALERTS_TEST.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:", tests))
    silent = set(re.findall(r"\{eval_time: \w+, alertname: (\w+)\}", tests))
    assert names, "no alert found in the rules file"
    assert names - firing == set(), "never shown firing"
    assert names - silent == set(), "never shown silent"
    assert (firing | silent) - names == set(), "tests for alerts that do not exist"


def test_shorten_for_divides_every_for_and_changes_nothing_else(tmp_path: Path) -> None:
    shipped = ALERTS.read_text()
    short = shorten_for(shipped, FACTOR)
    durations = rule_durations(shipped)
    assert durations["Cis490ReconcileCorruptTarballs"] == 90 * 60
    assert rule_durations(short) == {name: int(s * 1000) // FACTOR / 1000 for name, s in durations.items()}
    pairs = zip(shipped.splitlines(), short.splitlines(), strict=True)  # as many lines, or it raises
    changed = [(a.strip(), b.strip()) for a, b in pairs if a != b]
    assert len(changed) == sum(1 for s in durations.values() if s)
    assert all(a.startswith("for: ") and b.startswith("for: ") for a, b in changed)
    copy = tmp_path / "alerts-fast.yml"
    copy.write_text(short)
    proc = promtool("check", "rules", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- end to end --------------------------------------------------------------------


@dataclass
class Timing:
    """How long one scenario's alert took, for the printed report: from the
    end of the run that wrote the metrics to firing (scrape, evaluation and
    the shortened for:), and from the end of the fixing run to resolved."""

    scenario: str
    alert: str
    fired_s: float
    resolved_s: float | None = None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PrometheusStack]:
    """node_exporter and Prometheus on free localhost ports, evaluating the
    shortened copy of the rules; stopped (whole process groups) however the
    test ends."""
    reason = missing_binaries("prometheus", "node_exporter")
    if reason:
        pytest.skip(reason)
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    rules = tmp_path / "alerts-fast.yml"
    rules.write_text(shorten_for(ALERTS.read_text(), FACTOR))
    stack = PrometheusStack(tmp_path / "prometheus", rules, textfile, interval="1s")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def evaluated_rules(stack: PrometheusStack) -> list[dict[str, Any]] | None:
    """The loaded alert rules once each has been evaluated (a rule never
    evaluated has the zero time as lastEvaluation), else None."""
    rules = stack.alert_rules()
    if not rules or any(str(r["lastEvaluation"]).startswith("0001-") for r in rules):
        return None
    return rules


def file_value(path: Path, name: str) -> float:
    """A sample's value in a textfile, parsed as node_exporter would."""
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in {path}")


def wait_scraped(stack: PrometheusStack, path: Path, name: str) -> None:
    """Until Prometheus holds the value of `name` that the file has now."""
    want = file_value(path, name)
    wait_until(lambda: stack.query(name) == [want] or None, 10, f"{name} = {want} to be scraped")


def wait_alert(stack: PrometheusStack, name: str, since: float, timeout: float = 20) -> float:
    """Seconds from `since` (monotonic) until `name` fires."""
    wait_until(lambda: stack.alerts().get(name) == "firing", timeout, f"{name} to fire")
    return time.monotonic() - since


def wait_resolved(stack: PrometheusStack, name: str, since: float, timeout: float = 20) -> float:
    """Seconds from `since` until `name` is neither pending nor firing."""
    wait_until(lambda: name not in stack.alerts(), timeout, f"{name} to resolve")
    return time.monotonic() - since


def run_pass(receiver: Receiver, metrics: Path, *flags: str) -> tuple[Result, float]:
    """A real pass; its result and when it finished (monotonic)."""
    result = receiver.run("--metrics-file", str(metrics), *flags)
    return result, time.monotonic()


def run_scrub(receiver: Receiver, metrics: Path, state: Path) -> tuple[Result, float]:
    """A real scrub run; its result and when it finished (monotonic)."""
    argv = receiver.argv("--state-dir", str(state), "--metrics-file", str(metrics), command="scrub")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=receiver.root)
    finished = time.monotonic()
    return Result(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stdout)), finished


def test_alerts_fire_and_resolve_end_to_end(
    tmp_path: Path, stack: PrometheusStack, record_property: Callable[[str, object], None]
) -> None:
    began = time.monotonic()
    (tmp_path / "store").mkdir()
    receiver = Receiver(tmp_path / "store")
    metrics = stack.textfile_dir / "cis490_reconcile.prom"
    scrub_metrics = stack.textfile_dir / "cis490_reconcile_scrub.prom"
    quarantine = tmp_path / "quarantine"  # same filesystem as the episodes, outside them
    quarantine.mkdir()
    scrub_state = tmp_path / "scrub-state"
    scrub_state.mkdir()
    timings: list[Timing] = []

    # The rules Prometheus loaded are the shortened copy, and every one is
    # labelled, annotated and evaluates without error.
    shipped = rule_durations(ALERTS.read_text())
    rules = wait_until(lambda: evaluated_rules(stack), 10, "every rule to be evaluated once")
    assert {r["name"]: r["duration"] for r in rules} == {
        n: int(s * 1000) // FACTOR / 1000 for n, s in shipped.items()
    }
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["labels"]["severity"] in SEVERITIES, rule["name"]
        assert set(rule["annotations"]) >= ANNOTATIONS, rule["name"]
        assert rule["annotations"]["runbook_url"].startswith("README.md#"), rule["name"]

    # 1. A healthy store: a pass and a scrub find nothing; nothing fires,
    # nothing is even pending, over several evaluations after the scrape.
    for host, episode in (("robot-1", "a"), ("robot-1", "b"), ("robot-2", "c")):
        receiver.tarball(host, episode)
        receiver.append_row(receiver.receiver_row(host, episode))
    passed, _ = run_pass(receiver, metrics)
    assert passed.returncode == 0, passed.stderr
    assert passed.one("pass_finished")["backfilled"] == 0
    scrubbed, _ = run_scrub(receiver, metrics, scrub_state)
    assert scrubbed.returncode == 0, scrubbed.stderr
    assert scrubbed.one("scrub_finished")["ok"] == 3
    wait_scraped(stack, metrics, "cis490_reconcile_last_run_timestamp_seconds")
    wait_scraped(stack, scrub_metrics, "cis490_reconcile_scrub_last_run_timestamp_seconds")
    quiet_until = time.monotonic() + 3.5  # > 3 evaluations; the longest shortened for: is 3 s
    while time.monotonic() < quiet_until:
        assert stack.alerts() == {}
        time.sleep(0.1)

    # 2. A corrupt tarball (a valid one cut short): fires; a pass that
    # quarantines it resolves it.
    good = receiver.tarball("robot-1", "cut").read_bytes()
    receiver.tarball("robot-1", "cut", blob=good[: len(good) // 2])
    passed, finished = run_pass(receiver, metrics)
    assert passed.returncode == 0, passed.stderr
    assert passed.one("tarball_corrupt")["path"] == "robot-1/cut.tar.zst"
    timing = Timing("corrupt tarball", "Cis490ReconcileCorruptTarballs", 0.0)
    timing.fired_s = wait_alert(stack, timing.alert, finished)
    assert stack.alerts() == {timing.alert: "firing"}
    passed, finished = run_pass(
        receiver, metrics, "--quarantine-dir", str(quarantine), "--quarantine-min-age", "0"
    )
    assert passed.returncode == 0, passed.stderr
    assert (quarantine / "robot-1" / "cut.tar.zst").is_file()
    assert not (receiver.episodes / "robot-1" / "cut.tar.zst").exists()
    timing.resolved_s = wait_resolved(stack, timing.alert, finished)
    timings.append(timing)

    # 3. A pass that cannot take the index lock (another process holds it)
    # fails: fires; the next pass, lock free, succeeds and resolves it.
    receiver.tarball("robot-2", "new")  # unindexed: the pass must commit, so take the lock
    with LockHolder(receiver.index, "flock"):
        passed, finished = run_pass(receiver, metrics, "--lock-timeout", "1")
        assert passed.returncode == 1
        assert "lock" in passed.one("pass_failed")["error"]
        timing = Timing("pass fails: index lock held", "Cis490ReconcilePassFailing", 0.0)
        timing.fired_s = wait_alert(stack, timing.alert, finished)
        assert stack.alerts() == {timing.alert: "firing"}
    passed, finished = run_pass(receiver, metrics)
    assert passed.returncode == 0, passed.stderr
    assert receiver.keys().count(("robot-2", "new")) == 1  # backfilled, once
    timing.resolved_s = wait_resolved(stack, timing.alert, finished)
    timings.append(timing)

    # 4. One byte of an indexed tarball flipped (same size): the scrub finds
    # the mismatch and it fires.
    victim = receiver.episodes / "robot-1" / "a.tar.zst"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    scrubbed, finished = run_scrub(receiver, metrics, scrub_state)
    assert scrubbed.returncode == 1
    assert scrubbed.one("scrub_mismatch")["path"] == "robot-1/a.tar.zst"
    timing = Timing("scrub: flipped byte", "Cis490ReconcileScrubMismatch", 0.0)
    timing.fired_s = wait_alert(stack, timing.alert, finished)
    assert stack.alerts() == {timing.alert: "firing"}
    timings.append(timing)

    stack.stop()
    assert not stack.prometheus.running() and not stack.exporter.running()
    total = time.monotonic() - began
    print(f"\nalert latency (scrape {stack.interval}, evaluation {stack.interval}, for: / {FACTOR}):")
    for t in timings:
        resolved = (
            f", resolved {t.resolved_s:.2f} s after the fixing pass" if t.resolved_s is not None else ""
        )
        print(f"  {t.scenario:28} {t.alert:32} fired {t.fired_s:.2f} s after the run finished{resolved}")
    print(f"  end-to-end test body: {total:.1f} s")
    record_property("alert_timings", [vars(t) for t in timings])
    assert total < 60
