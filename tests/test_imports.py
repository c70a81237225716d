"""The import structure of the project's packages, read from the source with `ast` (nothing is
imported): every `import` and `from ... import` statement counts, at module level and inside
functions alike.

- No import cycle among the modules of model/, app/, cache/, views/ and bench/, within a package
  or across them (an import under TYPE_CHECKING counts too).
- Layers: model/ and cache/ never import app, views or bench; app/ never imports views or
  bench (the UI in views/ calls app/; the entry points app.py at the top and app/__main__.py,
  `python -m app`, join the two and are the only exception).
- Inside app/: the engine (app/engine/) never imports the studio's state (app/studio/) or the CLI.

An import of `a.b.c` is an edge to the module a.b.c (`from a.b import c`: to a.b.c where c is
a module, else to a.b); the packages a and a.b that Python runs first are not counted.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "app", "views", "cache", "bench")
FORBIDDEN = {
    "model": ("app", "views", "bench"),
    "cache": ("app", "views", "bench"),
    "app": ("views", "bench"),
}
# app/ in two rooms: the engine (answering) never imports the studio's state, the CLI or the console
ENGINE_FORBIDDEN = ("app.studio", "app.cli", "app.__main__")
ENTRY_POINTS = {"app.__main__"}  # `python -m app`: starts the studio, as app.py does


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "model.loading"
    target: str  # imported module of the project, e.g. "model.embedded"
    where: str  # "model/loading.py:20"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def known_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted `name` that is a module of the project (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module in `path`, wherever it stands in the file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = known_module(name, modules)
            if target is not None and target != module:
                found.append((node.lineno, Import(module, target, f"{path.relative_to(ROOT)}:{node.lineno}")))
    return [imp for _, imp in sorted(found, key=lambda pair: pair[0])]


def all_imports() -> list[Import]:
    modules = project_modules()
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (its modules in import order, the first repeated at the end) per back edge of a
    depth-first walk: an empty list exactly when the graph has no cycle."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_the_parser_sees_module_and_function_level_imports():
    imports = {(imp.source, imp.target) for imp in all_imports()}
    assert ("model.loading", "model.embedded") in imports  # module level
    assert ("app.studio.catalog", "model.embedded") in imports  # inside a function


def test_find_cycles_names_each_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle_in_any_package():
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for imp in all_imports():
        edges.setdefault(imp.source, set()).add(imp.target)
        where.setdefault((imp.source, imp.target), imp.where)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(cycle) + "  (" + ", ".join(where[a, b] for a, b in zip(cycle, cycle[1:])) + ")"
        for cycle in cycles
    )


def test_lower_layers_never_import_higher_ones():
    wrong = [
        f"{imp.where}: {imp.source} imports {imp.target}"
        for imp in all_imports()
        if imp.target.split(".")[0] in FORBIDDEN.get(imp.source.split(".")[0], ()) and imp.source not in ENTRY_POINTS
    ]
    assert not wrong, "imports against the layers (model, cache < app < views, bench):\n" + "\n".join(wrong)


def test_the_engine_never_imports_the_studios_state():
    wrong = [f"{imp.where}: {imp.source} imports {imp.target}" for imp in all_imports()
             if imp.source.startswith("app.engine") and imp.target.startswith(ENGINE_FORBIDDEN)]
    assert not wrong, "the engine (app/engine/) imports what stands above it:\n" + "\n".join(wrong)

