"""README is the operator's manual: its reference tables must be the code's,
every event the code logs must be in the events table (and no other), and
it must stay short enough to read."""

from __future__ import annotations

import re
from pathlib import Path

import readme_tables
from helpers import REPO

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
