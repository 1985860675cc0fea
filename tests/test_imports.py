"""The import graph of pluribus: which module imports which (module level and inside functions), and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pluribus"


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = f
    return out


def imports(name: str, file: Path, mods: dict[str, Path], *, top_level: bool) -> set[str]:
    """The pluribus modules ``file`` imports; ``from pkg import submodule`` counts as the submodule alone."""
    tree = ast.parse(file.read_text())
    out: set[str] = set()
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
            names = subs + ([node.module] if len(subs) < len(node.names) else [])
        else:
            continue
        for n in names:
            while n not in mods and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in mods and n != name and n.startswith("pluribus"):
                out.add(n)
    return out


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary cycle, as the sorted tuple of its modules."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for n in graph.get(node, ()):
            if n == start:
                found.add(tuple(sorted(path)))
            elif n not in path and n > start:
                walk(start, n, [*path, n])

    for s in sorted(graph):
        walk(s, s, [s])
    return found


def test_no_import_cycles_among_pluribus_modules() -> None:
    mods = modules()
    for top_level in (True, False):
        graph = {n: imports(n, f, mods, top_level=top_level) for n, f in mods.items()}
        assert not cycles(graph), "\n".join(" <-> ".join(c) for c in sorted(cycles(graph)))


def test_the_model_reference_and_file_reading_sit_below_config_and_models() -> None:
    mods = modules()
    graph = {n: imports(n, f, mods, top_level=False) for n, f in mods.items()}
    assert graph["pluribus.errors"] == set()
    assert graph["pluribus.modelref"] == {"pluribus.errors"}
    assert graph["pluribus.io"] == {"pluribus.errors"}
    assert "pluribus.config" not in graph["pluribus.models"] | graph["pluribus.merge.spec"]


PRIVATE_ACROSS_KNOWN: set[tuple[str, str, str]] = set()  # none: keep it so


def test_no_private_name_is_imported_across_packages() -> None:
    """``from pluribus.a.m import _name`` only inside package ``pluribus.a``: what another package uses is public
    (no leading underscore, a docstring), so a module's private names can change without breaking another's."""
    mods = modules()

    def package(module: str) -> str:
        return module if mods[module].name == "__init__.py" else module.rsplit(".", 1)[0]

    found = set()
    for name, file in mods.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in mods and node.level == 0:
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and package(node.module) != package(name):
                        found.add((name, node.module, alias.name))
    assert found <= PRIVATE_ACROSS_KNOWN, sorted(found - PRIVATE_ACROSS_KNOWN)
