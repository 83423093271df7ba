"""The house's layout, checked on the source of ``crener/`` (and, for function length, every
package of the house): functions short enough to read, and one setup path for a run's parts."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import crener

PACKAGE = Path(crener.__file__).resolve().parent
MAX_FUNCTION_LINES = 100
MAX_FIT_LINES = 60
HOUSE = ("crener", "experiments", "baselines", "reports")  # the packages held to the length bound


def _modules(packages: tuple[str, ...] = ("crener",)) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((PACKAGE.parent / package).rglob("*.py")):
            yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _functions(
    tree: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function of ``tree`` with its qualified name, nested ones and methods included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_in_the_house_is_over_100_lines() -> None:
    long = {
        f"{path}:{name}": _lines(fn)
        for path, tree in _modules(HOUSE)
        for name, fn in _functions(tree)
        if _lines(fn) > MAX_FUNCTION_LINES
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_fit_reads_as_the_training_loop() -> None:
    fits = [fn for path, tree in _modules() if path == "crener/train.py" for name, fn in _functions(tree)
            if name == "fit"]  # fmt: skip
    assert len(fits) == 1 and _lines(fits[0]) <= MAX_FIT_LINES


def _callers(callee: str) -> set[str]:
    """``module:function`` of every call of a function named ``callee`` in ``crener/``."""
    found = set()
    for path, tree in _modules():
        for name, fn in _functions(tree):
            direct = {n for n in ast.walk(fn) if isinstance(n, ast.Call)} - {
                n for inner in ast.iter_child_nodes(fn) if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(inner)
            }  # fmt: skip
            for call in direct:
                target = call.func
                called = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                if called == callee:
                    found.add(f"{path}:{name}")
    return found


def test_a_task_and_an_encoder_are_built_by_the_one_setup_function() -> None:
    # The registry's build_task dispatches to the family's own builder.
    assert _callers("build_task") == {"crener/train.py:build_parts", "crener/registry.py:build_task"}
    assert _callers("load_encoder") == {"crener/train.py:build_parts"}


def _imports() -> dict[str, set[str]]:
    """Module -> the ``crener`` modules it imports, at its top or inside functions alike. A name
    imported from a package is that submodule when one exists (``from crener import registry``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges |= {sub} if sub in modules else {node.module} & modules.keys()
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_no_import_cycle_in_crener() -> None:
    assert not _cycles(_imports())


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_module_imports_another_modules_private_names() -> None:
    root = PACKAGE.parent
    private = []
    for folder in ("crener", "experiments", "baselines", "reports"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                    names = [
                        a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                    ]
                    private += [f"{path.relative_to(root)}: {node.module}.{n}" for n in names]
                elif isinstance(node, ast.Import):
                    private += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                                if any(p.startswith("_") for p in a.name.split("."))]  # fmt: skip
    assert not private


# The command line registers the tools' subcommands; the old migrate path is a shim for
# entry points installed before the tools moved.
TOOL_USERS = {"crener.commands", "crener.migrate"}


def test_the_model_training_and_inference_never_import_the_tools() -> None:
    users = {name for name, edges in _imports().items() if not name.startswith("crener.tools")
             and any(e.startswith("crener.tools") for e in edges)}  # fmt: skip
    assert users <= TOOL_USERS
