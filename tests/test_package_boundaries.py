"""Package boundaries, read statically: who may import whom (docs/design.md, "Packages")."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO_ROOT

FORBIDDEN = {
    "kvledger": ("torch", "transformers", "mixsga", "baselines", "harness", "analysis"),
    "mixsga": ("baselines", "harness", "analysis"),
    "baselines": ("mixsga", "harness", "analysis"),
    "hfconvert": ("mixsga", "baselines", "harness", "analysis"),
}


def _imports(path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_method_packages_keep_to_their_imports(package):
    for path in sorted((REPO_ROOT / package).glob("*.py")):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in FORBIDDEN[package])
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {bad}"


def test_baselines_modules_import_no_cycle():
    graph = {p.stem: {n.split(".")[1] for n in _imports(p) if n.startswith("baselines.")}
             for p in (REPO_ROOT / "baselines").glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"baselines modules in an import cycle: {cycles}"
