"""The house's layout, checked on the source of ``crener/`` (issue 36): functions short enough to
read, and one setup path for a run's parts."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import crener

PACKAGE = Path(crener.__file__).resolve().parent
MAX_FUNCTION_LINES = 100
MAX_FIT_LINES = 60


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
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


def test_no_function_in_crener_is_over_100_lines() -> None:
    long = {
        f"{path}:{name}": _lines(fn)
        for path, tree in _modules()
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
