"""The codebase stays ruff clean (lint and format) and mypy --strict clean, checked with every test run."""

import ast
import subprocess
import sys
from pathlib import Path

from helpers import REPO

RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check() -> None:
    proc = subprocess.run([str(RUFF), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_ruff_format() -> None:
    proc = subprocess.run([str(RUFF), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_mypy_strict() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mypy")], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports:
    every import, including those made only for type checking or inside a
    function."""
    package = REPO / "cis490_reconcile"
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = [node.module] if node.module else []
                parent = here[: len(here) - node.level + 1] if node.level else []
                base = ".".join([*parent, *module])
                found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def test_no_import_cycles() -> None:
    """Modules depend one way: a cycle, even through an import made only for
    type checking, means a responsibility sits in the wrong module."""
    graph = _imports()
    assert graph["cis490_reconcile.state"] >= {"cis490_reconcile.state.keys"}  # the walk sees imports

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if reaches(b, a))
    assert cycles == []


def test_no_module_over_450_lines() -> None:
    """A module that long holds more than one responsibility: split it by what each part owns."""
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for p in (REPO / "cis490_reconcile").rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 450} == {}
