"""The source tree's shape: no import circles between peftlab's modules, and imports inside functions only for
optional dependencies (each module imports what it needs at its top, so a module's dependencies are in view)."""

from __future__ import annotations

import ast
from pathlib import Path

import peftlab

SRC = Path(peftlab.__file__).parent
#: third-party packages peftlab runs without (extras, or present only on some machines): imported where used
OPTIONAL = {
    "botorch",
    "datasets",
    "jax",
    "matplotlib",
    "numpyro",
    "optuna_dashboard",
    "peft",
    "psycopg2",
    "sqlalchemy",
    "tqdm",
    "yaml",
}
#: peftlab modules that import an optional dependency at their top: imported where used, like it
OPTIONAL_MODULES = {"peftlab.search.bo"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _imports(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> set[str]:
    """peftlab modules imported anywhere in the module, inside functions too (``from pkg import sub`` counts as
    importing ``pkg.sub``); imports under ``if TYPE_CHECKING:`` are left out, as they never run."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                target = _resolve(sub, module, is_package)
                found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in sub.names}
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    known = set(files)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package's ``__init__`` importing its own submodules is not a cycle."""
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_inside_functions_are_optional_dependencies_only() -> None:
    late = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or "."] if not node.level else ["."]
                allowed = [n.split(".")[0] in OPTIONAL or n in OPTIONAL_MODULES for n in names]
                late += [
                    f"{path.relative_to(SRC)}:{node.lineno} {n}" for n, ok in zip(names, allowed, strict=True) if not ok
                ]
    assert not late, "imports inside functions of required modules:\n" + "\n".join(late)
