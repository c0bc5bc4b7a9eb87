"""DESIGN's layering rules, checked on the source: which project modules may import which, no
import cycles, no module over `MAX_LINES` lines.

Imports are read with `ast` from every `import` / `from ... import` node anywhere in a file
(inside functions and under `if TYPE_CHECKING` too). Relative imports are resolved. The target of
`import a.b` is `a.b` (its `__init__`, not its submodules); the target of `from a.b import c` is
`a.b.c` when that is a module, else `a.b`. Only project modules (under `PACKAGES`) count.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "converters", "tasks")
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    """One imported project module: `source` imports `target` at `file:line`."""

    source: str
    target: str
    file: str
    line: int


@dataclass(frozen=True)
class Rule:
    """Modules within any of `sources` may not import modules within `forbidden`, but `allowed`."""

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def breaks(self, imp: Import) -> bool:
        """Whether `imp` is an import this rule forbids."""
        return (
            within(imp.source, self.sources)
            and within(imp.target, self.forbidden)
            and imp.target not in self.allowed
        )


RULES = (
    Rule("converters imports neither tasks nor config", ("converters",), ("tasks", "config")),
    Rule("config imports nothing from tasks", ("config",), ("tasks",)),
    Rule(
        "converters.powerinfer imports nothing from converters.megatron",
        ("converters.powerinfer",),
        ("converters.megatron",),
    ),
    Rule(
        "executors, ops, jobs and cli name no job-kind module (only tasks.kinds, tasks.kinds.base)",
        ("tasks.executors", "tasks.ops", "tasks.jobs", "tasks.cli"),
        ("tasks.kinds",),
        allowed=("tasks.kinds", "tasks.kinds.base"),
    ),
)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module `name` is one of `prefixes` or lies under one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_modules(root: Path) -> dict[str, Path]:
    """Every module under `root`'s `PACKAGES`, by dotted name (a package by its `__init__.py`)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from X import ...` node names as X."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """The project modules `module` (at `path`) imports, one entry per imported name."""
    is_package = path.name == "__init__.py"
    file = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found += [
            Import(module, target, file, node.lineno)
            for target in targets
            if within(target, PACKAGES)
        ]
    return sorted(found, key=lambda imp: (imp.file, imp.line, imp.target))


def all_imports(root: Path) -> list[Import]:
    """Every project import of every module under `root`."""
    modules = find_modules(root)
    return [imp for m, p in modules.items() for imp in imports_of(m, p, modules, root)]


def rule_violations(rule: Rule, imports: list[Import]) -> list[str]:
    """`file:line imports X (rule: ...)` for each import that breaks `rule`."""
    return [
        f"{imp.file}:{imp.line} imports {imp.target} (rule: {rule.name})"
        for imp in imports
        if rule.breaks(imp)
    ]


def import_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """module → {imported module → its first import}; a module importing itself is no edge."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, {})
        if imp.target != imp.source:
            graph[imp.source].setdefault(imp.target, imp)
    return graph


def _reachable(graph: dict[str, dict[str, Import]], start: str) -> set[str]:
    """Every module reachable from `start` by one or more imports."""
    seen: set[str] = set()
    todo = list(graph.get(start, {}))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, {})
    return seen


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component, as [a, b, ..., a], starting from
    the component's alphabetically first module."""
    reach = {node: _reachable(graph, node) for node in graph}
    cycles, covered = [], set()
    for start in sorted(graph):
        if start in covered or start not in reach[start]:
            continue
        component = {n for n in reach[start] if start in reach.get(n, set())}
        covered |= component
        previous: dict[str, str] = {}
        queue = deque([start])
        while start not in previous:  # breadth-first, back to `start` within the component
            node = queue.popleft()
            for nxt in sorted(graph[node]):
                if nxt in component and nxt not in previous:
                    previous[nxt] = node
                    queue.append(nxt)
        path, node = [start], previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    """`a → b → a` followed by the file:line of each import on the way."""
    edges = [graph[a][b] for a, b in pairwise(cycle)]
    where = "; ".join(f"{e.file}:{e.line} imports {e.target}" for e in edges)
    return f"{' → '.join(cycle)}  ({where})"


def long_modules(root: Path) -> list[str]:
    """`file: N lines` for each module over `MAX_LINES` lines."""
    counts = {p: len(p.read_text().splitlines()) for p in find_modules(root).values()}
    return [
        f"{p.relative_to(root).as_posix()}: {n} lines (max {MAX_LINES})"
        for p, n in sorted(counts.items())
        if n > MAX_LINES
    ]


@pytest.fixture(scope="module")
def project_imports() -> list[Import]:
    return all_imports(ROOT)


@pytest.mark.parametrize("rule", RULES, ids=["converters", "config", "powerinfer", "kinds"])
def test_layering_rule(rule: Rule, project_imports: list[Import]) -> None:
    problems = rule_violations(rule, project_imports)
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_no_import_cycles(project_imports: list[Import]) -> None:
    graph = import_graph(project_imports)
    cycles = [describe_cycle(c, graph) for c in find_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_are_short() -> None:
    problems = long_modules(ROOT)
    assert not problems, f"modules over {MAX_LINES} lines:\n" + "\n".join(problems)


def test_checker_finds_planted_violations(tmp_path: Path) -> None:
    """The engine on a fake tree: each planted violation is reported, nothing else is."""
    files = {
        "config/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tasks\n",
        "converters/__init__.py": "",
        "converters/bad.py": "import os\n\ndef f():\n    from tasks.jobs import ids\n",
        "converters/powerinfer/__init__.py": "from ..megatron import load_pt\n",
        "converters/megatron/__init__.py": "load_pt = None\n",
        "tasks/__init__.py": "",
        "tasks/a.py": "from tasks import b\n",
        "tasks/b.py": "from . import a\nfrom tasks.kinds import kind_named\n",
        "tasks/jobs/__init__.py": "",
        "tasks/jobs/ids.py": "x = 1\n" * (MAX_LINES + 1),
        "tasks/kinds/__init__.py": "from tasks.kinds.base import JobKind\nkind_named = None\n",
        "tasks/kinds/base.py": "JobKind = object\n",
        "tasks/kinds/llama.py": "from . import base\n",
        "tasks/cli/__init__.py": "from tasks.kinds import base, kind_named, llama\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    imports = all_imports(tmp_path)
    assert [v for rule in RULES for v in rule_violations(rule, imports)] == [
        f"converters/bad.py:4 imports tasks.jobs.ids (rule: {RULES[0].name})",
        f"config/__init__.py:3 imports tasks (rule: {RULES[1].name})",
        f"converters/powerinfer/__init__.py:1 imports converters.megatron (rule: {RULES[2].name})",
        f"tasks/cli/__init__.py:1 imports tasks.kinds.llama (rule: {RULES[3].name})",
    ]
    graph = import_graph(imports)
    assert find_cycles(graph) == [["tasks.a", "tasks.b", "tasks.a"]]
    assert describe_cycle(["tasks.a", "tasks.b", "tasks.a"], graph) == (
        "tasks.a → tasks.b → tasks.a  (tasks/a.py:1 imports tasks.b; tasks/b.py:1 imports tasks.a)"
    )
    assert long_modules(tmp_path) == [f"tasks/jobs/ids.py: {MAX_LINES + 1} lines (max {MAX_LINES})"]
