"""The code's shape is checked, not hoped for: no import cycles, no private names across modules, no huge modules.

Cycles make import order matter and hide layering mistakes; importing another module's private names
couples code to what its owner may change at any time; a module over 500 lines owns too much to review.
Every import statement counts, wherever it sits (top level, a function, an `if TYPE_CHECKING:` block),
because each one is a real dependency. The generated stubs under client/park/_proto/ are excluded: they
are the documented wire package that every part of the project imports.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("client", "park"), ("broker", "park_broker"), ("agent", "park_agent"))
GENERATED = "park._proto"  # generated wire stubs: excluded from every rule
SCRIPT_DIRS = ("tests", "bench")  # not packages; checked for private imports only
MAX_LINES = 500

Imports = list[tuple[int, str, str | None]]  # (line, module imported from, name or None for `import x`)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def source_modules(root: Path) -> dict[str, Path]:
    """Every project module (dotted name -> file) under root; packages are their __init__.py."""
    found: dict[str, Path] = {}
    for src, top in SOURCES:
        for path in sorted((root / src / top).rglob("*.py")):
            parts = list(path.relative_to(root / src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not _under(name, GENERATED) and "__pycache__" not in parts:
                found[name] = path
    return found


def _statements(body: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every statement, however nested (functions, classes, if/try/with/match blocks); imports are statements."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


@cache
def imports_in(path: Path, module: str) -> Imports:
    """Every import statement in the file, with relative imports made absolute against its package."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: Imports = []
    for node in _statements(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found += [(node.lineno, base, alias.name) for alias in node.names]
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import of `name` depends on: the name itself, else its longest existing parent."""
    if _under(name, GENERATED):
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line of that import}, among the project's modules."""
    modules = source_modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for line, base, name in imports_in(path, module):
            # `from pkg import x` depends on pkg.x when that is a module, else on pkg itself;
            # `import pkg.sub.mod` depends on pkg.sub.mod only, not on the parents' __init__.
            if name and _under(f"{base}.{name}", GENERATED):
                continue
            target = _resolve(f"{base}.{name}" if name and f"{base}.{name}" in modules else base, modules)
            if target is not None:
                edges.setdefault(target, line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module, plus modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph.get(node, {}):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def cycle_through(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest import chain from the component's first module back to itself (breadth-first)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    return [*reversed(chain), start]
                if succ in members and succ not in came_from:
                    came_from[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a real component


def cycles(root: Path) -> list[str]:
    """One line per cycle: the chain, each hop with the file and line of its import."""
    graph, modules = import_graph(root), source_modules(root)
    found = []
    for component in strongly_connected(graph):
        chain = cycle_through(graph, component)
        hops = ", ".join(f"{a} imports {b} at {modules[a].relative_to(root)}:{graph[a][b]}" for a, b in pairwise(chain))
        found.append(f"{' -> '.join(chain)}  ({hops}; all modules in this cycle: {', '.join(component)})")
    return found


def _checked_files(root: Path) -> Iterator[tuple[Path, str, str | None]]:
    """(file, module name, its own top-level package or None) for the sources, tests/ and bench/."""
    for module, path in source_modules(root).items():
        yield path, module, module.split(".")[0]
    for folder in SCRIPT_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path, path.stem, None


def private_imports(root: Path) -> list[str]:
    """Imports of another module's private names, or of private modules outside the importer's own package."""
    modules = source_modules(root)
    found = []
    for path, module, own in _checked_files(root):
        where = path.relative_to(root)
        for line, base, name in imports_in(path, module):
            full = f"{base}.{name}" if name else base
            if base == "__future__" or _under(full, GENERATED) or _under(base, GENERATED):
                continue
            if any(map(_private, base.split("."))) and base.split(".")[0] != own:
                found.append(f"{where}:{line}: imports private module {base}")
            elif name and _private(name) and not (full in modules and full.split(".")[0] == own):
                found.append(f"{where}:{line}: imports private {name} from {base}")
    return found


def oversized_modules(root: Path) -> list[str]:
    """Project modules over MAX_LINES lines."""
    counts = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in source_modules(root).values()}
    return [f"{path.relative_to(root)}: {count} lines" for path, count in counts.items() if count > MAX_LINES]


def test_no_import_cycles() -> None:
    found = cycles(ROOT)
    assert not found, (
        "Import cycles among the project's modules (break the cycle: move the shared code into a module both "
        "can import, invert the dependency, or pass the object in instead of importing it):\n  " + "\n  ".join(found))


def test_no_private_imports_across_modules() -> None:
    found = private_imports(ROOT)
    assert not found, (
        "Imports of private names or private modules (make the name public or move it to the module that uses it; "
        "only a module's own top-level package may import its private modules):\n  " + "\n  ".join(found))


def test_no_module_over_500_lines() -> None:
    found = oversized_modules(ROOT)
    assert not found, (
        f"Modules over {MAX_LINES} lines (split by what it owns: one module per responsibility, "
        "and keep the package's public imports stable):\n  " + "\n  ".join(found))


def test_checker_catches_what_it_claims(tmp_path: Path) -> None:
    files = {
        "client/park/__init__.py": "from park.api import run\nfrom park import _proto\n",
        "client/park/api.py": "import park.sub.leaf\nrun = 1\n",
        "client/park/a.py": "def f() -> None:\n    from park import b\n",  # function-local import
        "client/park/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "client/park/selfish.py": "import park.selfish\n",
        "client/park/uses_root.py": "from park import run\n",  # a name, so the edge goes to `park`
        "client/park/sub/__init__.py": "",
        "client/park/sub/leaf.py": "from .. import uses_root\nfrom park._helpers import x\nfrom park.a import _f\n",
        "client/park/_helpers.py": "x = 1\n",
        "client/park/_proto/__init__.py": "import park\n",  # generated: ignored
        "client/park/_proto/jobs_pb2.py": "from park import _private_thing\n",
        "broker/park_broker/__init__.py": "from park._helpers import x\nfrom park._proto import jobs_pb2\n",
        "agent/park_agent/__init__.py": "from __future__ import annotations\nfrom park import __version__\n",
        "tests/test_x.py": "from harness import _make\nimport park._helpers\n",
        "client/park/big.py": "x = 1\n" * (MAX_LINES + 1),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    root, graph = tmp_path, import_graph(tmp_path)
    assert "park" not in graph["park"]  # `from park import _proto` is generated code, not a self-import
    assert "park" not in graph["park.api"] and "park.sub" not in graph["park.api"]  # no edges to parents
    assert set(graph["park.sub.leaf"]) == {"park.uses_root", "park._helpers", "park.a"}
    assert "park._proto" not in graph and not any(GENERATED in t for e in graph.values() for t in e)
    assert strongly_connected(graph) == [
        ["park", "park.api", "park.sub.leaf", "park.uses_root"], ["park.a", "park.b"], ["park.selfish"]]
    assert cycle_through(graph, ["park.a", "park.b"]) == ["park.a", "park.b", "park.a"]
    assert cycles(root)[1].startswith("park.a -> park.b -> park.a  (park.a imports park.b at client/park/a.py:2")
    assert private_imports(root) == [
        "client/park/sub/leaf.py:3: imports private _f from park.a",
        "broker/park_broker/__init__.py:1: imports private module park._helpers",
        "tests/test_x.py:1: imports private _make from harness",
        "tests/test_x.py:2: imports private module park._helpers",
    ]
    assert oversized_modules(root) == [f"client/park/big.py: {MAX_LINES + 1} lines"]
