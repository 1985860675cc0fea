"""The shape of pluribus's code: no function longer than 60 lines (a reader finds each loop without scrolling;
a longer one is split into named steps, as torchtune's recipes are)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pluribus"
MAX_LINES = 60


def test_no_function_is_longer_than_sixty_lines() -> None:
    long = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_LINES:
                    long.append(f"{f.relative_to(PACKAGE.parent)}::{node.name} ({lines} lines)")
    assert not long, "split into named steps: " + ", ".join(long)
