"""The package's structure: no import cycles, the library never imports the commands (``cli/``)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = 'basicsr_mambair'


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that ``path`` imports, anywhere in the file (also inside functions)."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)]
                base = '.'.join(anchor + ([base] if base else []))
            # `from X import Y`: Y is a module of X, or a name defined in X
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted((REPO / PACKAGE).rglob('*.py'))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 40 and f'{PACKAGE}.ops.scan.compiled' in graph  # the walk sees the package
    assert _cycles(graph) == []


# `python basicsr_mambair/train.py -opt ...` (HAT's layout): two-line wrappers of the commands
WRAPPERS = {f'{PACKAGE}.train', f'{PACKAGE}.test'}


def test_the_library_never_imports_the_commands() -> None:
    cli = f'{PACKAGE}.cli'
    offenders = {m: sorted(t for t in deps if t == cli or t.startswith(cli + '.'))
                 for m, deps in _graph().items() if not (m == cli or m.startswith(cli + '.') or m in WRAPPERS)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The cycle finder itself, on a made-up graph (so the tests above can fail)."""
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []
