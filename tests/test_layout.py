"""The source tree's shape: no import circles between peftlab's modules, and no imports inside functions (each
module imports what it needs at its top, so its dependencies are in view; optional ones go through
peftlab.optional, which says in one line what is missing and how to install it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftlab
from peftlab import optional
from peftlab.errors import PeftlabError

SRC = Path(peftlab.__file__).parent


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


def test_no_imports_inside_functions() -> None:
    """Optional dependencies are imported through peftlab.optional.require, everything else at the module's top."""
    late = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for fn in ast.walk(ast.parse(path.read_text()))
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    assert not late, "imports inside functions:\n" + "\n".join(late)


def test_optional_dependencies_fail_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(optional.INSTALL, "nothing_such", ("nothing-such", "pip install nothing-such"))
    with pytest.raises(PeftlabError, match=r"^plotting needs nothing-such: pip install nothing-such$"):
        optional.require("nothing_such.pyplot", "plotting")
    with pytest.raises(ValueError, match="not one of peftlab's optional dependencies"):
        optional.require("json", "anything")
