"""README is the operator's manual: its reference tables must be the code's,
every event the code logs must be in the events table (and no other), and
it must stay short enough to read."""

from __future__ import annotations

import fcntl
import re
import subprocess
from pathlib import Path

import readme_tables
from helpers import REPO, Receiver, Result, parse_events

from cis490_reconcile.events import EVENTS

_LOGGED = re.compile(r'\.(?:info|warning|error|debug|exception)\(\s*"([a-z_]+)"', re.S)
_NAMED = re.compile(r'"([a-z]+(?:_[a-z]+)+)"')


def test_generated_tables_match_the_code() -> None:
    text = readme_tables.README.read_text()
    assert readme_tables.render(text) == text, "run: python tests/readme_tables.py --write"


def test_every_event_logged_is_in_the_table_and_no_other() -> None:
    sources = "\n".join(
        p.read_text() for p in (REPO / "cis490_reconcile").rglob("*.py") if p.name != "events.py"
    )
    logged = set(_LOGGED.findall(sources))
    assert logged - set(EVENTS) == set(), "logged but not in events.EVENTS"
    named = set(_NAMED.findall(sources))  # events picked at run time are named in the code too
    assert set(EVENTS) - named == set(), "in events.EVENTS but named nowhere in the code"


def test_readme_is_short_and_points_nowhere_outside_the_repository() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 600
    for link in re.findall(r"\]\(([^)#][^)]*)\)", text):
        if not link.startswith("http"):
            assert (REPO / link).exists(), link
    assert re.search(r"\.\./", text) is None, "a path above the repository"
    for doc in set(re.findall(r"[\w./-]+\.md\b", text)):  # every document it names is in the repository
        assert (REPO / doc).exists() or any(REPO.glob(f"*/{doc}")), doc


def test_the_two_setup_commands_are_there() -> None:
    text = (REPO / "README.md").read_text()
    assert ".venv/bin/cis490-reconcile demo" in text
    assert "bash .ci/run" in text or ".venv/bin/pytest" in text
    assert Path(REPO / ".ci/run").exists()


def _unnamed(event: dict) -> list[str]:
    """The fields of a logged event its row of README's table does not name."""
    text = EVENTS[event["event"]][1]
    return [f for f in event if f not in ("ts", "level", "event") and f"`{f}`" not in text]


def test_the_summaries_name_every_field_a_real_run_logs(receiver: Receiver) -> None:
    """An operator's jq selects what the events table names: every field of
    a real pass's and scrub's summary is there, and a refused scrub's
    `lock_file` is said to be the scrub's own lock, not the index's."""
    receiver.tarball("h", "a")
    assert _unnamed(receiver.run().one("pass_finished")) == []
    state = receiver.root / "state"
    state.mkdir()
    scrub = receiver.argv("--state-dir", str(state), command="scrub")
    out = subprocess.run(scrub, capture_output=True, text=True, timeout=60).stdout
    assert _unnamed(Result(0, out, "", parse_events(out)).one("scrub_finished")) == []
    with open(state / "scrub.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = subprocess.run(scrub, capture_output=True, text=True, timeout=60).stdout
    (event,) = parse_events(refused)
    assert event["event"] == "scrub_already_running" and _unnamed(event) == []
    assert f"<state_dir>/{Path(event['lock_file']).name}" in EVENTS["scrub_already_running"][1]


def test_the_status_example_begins_as_real_output_does(receiver: Receiver) -> None:
    """README shows `status` as real output: its first lines (the paths,
    a blank line, the columns) must be what the command prints."""
    receiver.tarball("robot-03", "a")  # a host name as wide as README's
    argv = receiver.argv("--state-dir", "", command="status")
    real = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.splitlines()
    found = re.search(r"\$ cis490-reconcile status\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert found is not None
    example = found[1].splitlines()
    assert real[0] == f"episodes {receiver.episodes}   index {receiver.index}"
    assert example[0] == "episodes /var/lib/cis490/episodes   index /var/lib/cis490/index.jsonl"
    assert example[1:3] == real[1:3]
