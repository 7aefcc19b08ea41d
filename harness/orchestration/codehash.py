"""Code hashes derived from imports: a job's hash covers the repository code its command runs.

The workflow passes each job's hash as a param, so that editing code reruns exactly the jobs
that execute it. Nothing here is kept by hand: modules are parsed with ``ast`` (never imported,
so this stays fast and torch-free) and their imports followed inside the repository.

What counts as an import of module ``a.b.c`` (see :meth:`ImportGraph.imports`):

* every ``import`` / ``from ... import`` statement anywhere in the file, function bodies too
  (the harness imports heavy modules inside its commands);
* ``from x import y`` names ``x.y`` when ``y`` is a submodule, else ``x`` itself;
  relative imports are resolved against the importing module;
* the ``__init__.py`` of each package along the path (``a``, ``a.b``) is hashed, but its own
  imports are not followed: a package re-exporting all its modules would otherwise tie every
  sibling together (editing ``baselines/eviction.py`` would rerun the GQA runs). Importing the
  package itself (``from mixsga import MixSGAConfig``) does follow them.

Method code is split off, so that editing mixSGA reruns mixSGA's jobs and not the base or GQA
ones: the method registry's imports of method code (``mixsga/``, ``baselines/`` and the other
``harness.methods`` modules) are cut, and a job adds back the closure of its own method's
modules (:func:`method_modules`). Code that imports method code directly (say
``harness.orchestration.run`` using ``mixsga.budget``) keeps it: every job of that code runs it.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterable

from harness.orchestration.config import REPO_ROOT, code_hash

#: Top-level packages holding method implementations (never imported by the harness's own
#: stages except through the registry, or where a stage genuinely runs their code).
METHOD_PACKAGES = ("mixsga", "baselines")
#: The package whose registry maps a method name to its code.
METHODS_PACKAGE = "harness.methods"
#: Functions whose defining module is the registry (by name -> method lookup).
REGISTRY_FUNCTIONS = ("get_spec", "get_method")


def _statements(body: Iterable[ast.AST]) -> Iterable[ast.AST]:
    """Every statement in ``body``, nested ones too (imports are statements: expressions are skipped)."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, field, None) or ())


class ImportGraph:
    """The static import graph of the Python packages under ``root`` (parsed once, cached)."""

    def __init__(self, root: Path = REPO_ROOT) -> None:
        self.root = Path(root)

    @functools.cache
    def path(self, module: str) -> Path | None:
        """The file of a repository module (``a/b.py`` or ``a/b/__init__.py``), None if not ours."""
        parts = module.split(".")
        top = self.root / parts[0]
        if not ((top / "__init__.py").is_file() or top.with_suffix(".py").is_file()):
            return None
        base = self.root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def is_package(self, module: str) -> bool:
        """Whether ``module`` is a package (its file is an ``__init__.py``)."""
        path = self.path(module)
        return path is not None and path.name == "__init__.py"

    @functools.cache
    def tree(self, module: str) -> ast.Module:
        """The parsed source of a repository module."""
        path = self.path(module)
        if path is None:
            raise ValueError(f"{module!r} is not a module of the repository at {self.root}")
        return ast.parse(path.read_bytes(), filename=str(path))

    def _resolve(self, module: str, node: ast.ImportFrom) -> str | None:
        """The absolute package a ``from ... import`` statement of ``module`` imports from."""
        if not node.level:
            return node.module
        package = module.split(".") if self.is_package(module) else module.split(".")[:-1]
        if node.level - 1 > len(package) - 1:
            return None  # beyond the top-level package: not ours to follow
        base = package[: len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _targets(self, module: str, nodes: Iterable[ast.AST]) -> set[str]:
        found: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = self._resolve(module, node)
                if source is None or source == "__future__":
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    found.add(sub if alias.name != "*" and self.path(sub) is not None else source)
        return {name for name in found if self.path(name) is not None}

    @functools.cache
    def imports(self, module: str, function: str | None = None) -> frozenset[str]:
        """Repository modules ``module`` imports (anywhere in it, or only where ``function`` runs).

        With ``function``: the module's top level, that top-level function and the top-level
        functions it calls by name (transitively) - what a command dispatching to one
        function executes, not its sibling commands.
        """
        tree = self.tree(module)
        if function is None:
            return frozenset(self._targets(module, _statements(tree.body)))
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if function not in defs:
            raise ValueError(f"{module} defines no top-level function {function!r}")
        nodes = list(_statements([n for n in tree.body if n.__class__ not in (ast.FunctionDef, ast.AsyncFunctionDef)]))
        seen, todo = set(), [function]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            nodes += _statements([defs[name]])
            todo += [n.id for n in ast.walk(defs[name]) if isinstance(n, ast.Name) and n.id in defs]
        return frozenset(self._targets(module, nodes))

    def top_level_imports(self, module: str) -> set[str]:
        """Repository modules imported by ``module``'s top-level statements (not in functions or blocks)."""
        return self._targets(module, self.tree(module).body)

    @functools.cache
    def commands(self, module: str) -> dict[str, str]:
        """Subcommand -> the function ``module`` registers for it: ``add("train", cmd_train, ...)``."""
        tree = self.tree(module)
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        found: dict[str, str] = {}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and isinstance(node.args[1], ast.Name)
                    and node.args[1].id in defs):
                found.setdefault(node.args[0].value, node.args[1].id)
        return found

    def parents(self, module: str) -> list[str]:
        """The packages along a module's path (``a``, ``a.b`` for ``a.b.c``)."""
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]


class CodeHashes:
    """Closures and hashes of the workflow's commands and methods, each computed once."""

    def __init__(self, root: Path = REPO_ROOT) -> None:
        self.graph = ImportGraph(root)
        self.root = self.graph.root
        self.registry = frozenset(self._registry_modules())

    def _registry_modules(self) -> list[str]:
        """The modules of ``harness.methods`` that look a method up by name."""
        path = self.graph.path(METHODS_PACKAGE)
        if path is None or path.name != "__init__.py":
            return []
        names = [METHODS_PACKAGE] + [f"{METHODS_PACKAGE}.{p.stem}" for p in sorted(path.parent.glob("*.py"))
                                     if p.name != "__init__.py"]
        return [m for m in names if any(
            isinstance(n, ast.FunctionDef) and n.name in REGISTRY_FUNCTIONS for n in self.graph.tree(m).body)]

    def is_method_code(self, module: str) -> bool:
        """Whether ``module`` implements a method: the method packages and harness.methods' modules."""
        top = module.split(".")[0]
        if top in METHOD_PACKAGES:
            return True
        return module.startswith(METHODS_PACKAGE + ".") and module not in self.registry

    def closure(self, roots: Iterable[str], scope: tuple[tuple[str, str], ...] = (), cut: bool = True) -> frozenset[str]:
        """Repository files (relative paths) that importing ``roots`` runs.

        ``scope`` maps a module to the one function it runs (a command); ``cut`` drops the
        registry's imports of method code (the job adds its own method's closure).
        """
        return self._closure(tuple(sorted(set(roots))), scope, cut)

    @functools.cache
    def _closure(self, roots: tuple[str, ...], scope: tuple[tuple[str, str], ...], cut: bool) -> frozenset[str]:
        scoped = dict(scope)
        files: set[str] = set()
        seen: set[str] = set()
        todo = list(roots)
        for module in roots:
            if self.graph.path(module) is None:
                raise ValueError(f"{module!r} is not a module of the repository at {self.root}")
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            for name in [*self.graph.parents(module), module]:
                files.add(self.graph.path(name).relative_to(self.root).as_posix())
            for target in self.graph.imports(module, scoped.get(module)):
                if cut and module in self.registry and self.is_method_code(target):
                    continue
                todo.append(target)
        return frozenset(files)

    @functools.cache
    def command(self, command: str, cut: bool = False) -> frozenset[str]:
        """Files that ``python -m <command>`` runs: ``"harness train"``, ``"analysis collate"``, a module.

        A package runs its ``__main__``; a subcommand that a module it imports registers as one
        function (``harness/cli.py``'s ``add("train", cmd_train, ...)``) runs that function only.
        Without such a registration (``analysis``) the whole entry is covered.
        """
        module, _, sub = command.partition(" ")
        entry = f"{module}.__main__" if self.graph.is_package(module) else module
        if self.graph.path(entry) is None:
            raise ValueError(f"python -m {module}: no module {entry!r} in the repository at {self.root}")
        scope: tuple[tuple[str, str], ...] = ()
        if sub:
            # the entry itself, or a module its top level imports (harness/__main__.py: harness.cli)
            for candidate in [entry, *sorted(self.graph.top_level_imports(entry))]:
                function = self.graph.commands(candidate).get(sub)
                if function is not None:
                    scope = ((candidate, function),)
                    break
        return self.closure([entry], scope, cut)

    @functools.cache
    def method(self, method: str) -> frozenset[str]:
        """Files that a method's implementation runs (the closure of :func:`method_modules`)."""
        return self.closure(method_modules(method))

    def digest(self, files: Iterable[str]) -> str:
        """The 12-hex-digit hash of these files' paths and contents."""
        return code_hash(sorted(set(files)), root=self.root)

    @functools.cache
    def command_hash(self, command: str) -> str:
        """Hash of everything ``python -m <command>`` runs, every method's code it reaches included."""
        return self.digest(self.command(command))

    @functools.cache
    def method_job_hash(self, command: str, method: str) -> str:
        """Hash of a job running one method: the command without method code, plus that method's."""
        return self.digest(self.command(command, cut=True) | self.method(method))

    def methods_job_hash(self, command: str, methods: Iterable[str]) -> str:
        """Hash of a job running several methods (the cost benchmark): the command plus each method's code."""
        files = set(self.command(command, cut=True))
        for method in methods:
            files |= self.method(method)
        return self.digest(files)


def method_modules(method: str) -> tuple[str, ...]:
    """Dotted modules implementing ``method`` (a stacked one: its eviction's and its inner's): its spec's."""
    from harness.methods import get_spec  # torch-free

    return tuple(get_spec(method).modules)
