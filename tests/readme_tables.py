"""README's reference tables, generated from the code that defines them:
settings (config.SETTINGS), events (events.EVENTS), metrics (metrics.PASS,
metrics.SCRUB). Each sits between <!-- BEGIN name --> and <!-- END name -->.

    .venv/bin/python tests/readme_tables.py          # exit 1 if README.md differs
    .venv/bin/python tests/readme_tables.py --write  # regenerate them in place

tests/test_readme.py runs the check with every test run.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from cis490_reconcile import config, metrics
from cis490_reconcile.events import EVENTS

README = Path(__file__).resolve().parent.parent / "README.md"


def _default(s: config.Setting) -> str:
    value = s.default
    if value is None:
        return "unset"
    if value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value >> 20}M`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _md(text: str) -> str:
    """Plain text safe in a markdown table cell."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def settings() -> str:
    rows = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for s in config.SETTINGS:
        flag = s.flag + (f" {s.metavar}" if s.metavar and not s.is_switch else "")
        rows.append(f"| `{s.key}` | `{flag}` | {_default(s)} | {_md(s.help)} |")
    return "\n".join(rows)


def events() -> str:
    rows = ["| event | level | when, and its fields |", "|---|---|---|"]
    rows += [f"| `{name}` | {level} | {what} |" for name, (level, what) in EVENTS.items()]
    return "\n".join(rows)


def metrics_table() -> str:
    rows = ["| metric | labels | meaning |", "|---|---|---|"]
    rows.append(f"| `{metrics.NS}_build_info` | `version`, `python` | {metrics.BUILD_INFO} |")
    for command, table in (("pass", metrics.PASS), ("scrub", metrics.SCRUB)):
        for m in table:
            labels = ", ".join(f"`{label}`" for label in m.labels)
            rows.append(f"| `{m.full_name(command)}` | {labels} | {_md(m.help)} |")
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {"settings": settings, "events": events, "metrics": metrics_table}


def render(text: str) -> str:
    """`text` with every generated block brought up to date."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        found = pattern.search(text)
        if not found:
            raise SystemExit(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        text = text[: found.start()] + found.group(1) + make() + "\n" + found.group(2) + text[found.end() :]
    return text


def main(argv: list[str]) -> int:
    text = README.read_text()
    fresh = render(text)
    if "--write" in argv:
        README.write_text(fresh)
        return 0
    if fresh != text:
        print("README.md's generated tables are out of date: python tests/readme_tables.py --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
