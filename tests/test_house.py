"""The house rules of docs/design.md ("Where things live"), checked on the code as it stands.

Read from the source (nothing is run): module-level imports between the project's modules, function lengths,
and where Optuna's private names and the retry loop appear.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("search", "trainer")
MAX_FUNCTION_LINES = 70


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(("koopman_search", *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project's modules it imports at module level (``from pkg import mod`` names mod)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("koopman_search"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[name].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def _circles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt in nodes and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in nodes:
        if not state.get(node):
            visit(node)
    return found


def test_no_module_imports_another_in_a_circle() -> None:
    modules = _modules()
    assert _circles(_imports(modules), sorted(modules)) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph, ["a", "b", "c", "d"]) == [["a", "b", "c", "a"]]


def test_the_trainer_imports_nothing_of_the_search() -> None:
    graph = _imports(_modules())
    leaks = {m: sorted(t for t in targets if ".search" in t) for m, targets in graph.items() if ".trainer" in m}
    assert {m: t for m, t in leaks.items() if t} == {}


def test_search_keeps_one_folder_per_concept_and_few_loose_modules() -> None:
    loose = sorted(p.name for p in (REPO / "search").glob("*.py"))
    assert [n for n in loose if n not in ("__init__.py", "errors.py")] == ["settings.py", "text.py"]
    folders = sorted(p.name for p in (REPO / "search").iterdir() if (p / "__init__.py").is_file())
    assert folders == ["cli", "engine", "pruning", "review", "storage", "studyfile", "workers"]


def test_no_function_is_longer_than_the_house_allows() -> None:
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def _files_matching(pattern: str) -> list[str]:
    found = re.compile(pattern)
    return sorted(
        str(path.relative_to(REPO)) for path in _modules().values() if found.search(path.read_text(encoding="utf-8"))
    )


def test_optunas_private_names_are_reached_through_one_adapter() -> None:
    private = r"\.(_storage|_study_id|_trial_id|_backend|_get_filepath|_CachedStorage)\b|optuna\.storages\._"
    # a class's own attributes named like them (self._storage) are not Optuna's
    hits = [
        f
        for f in _files_matching(private)
        if re.search(
            r"(?<!self)\.(_storage|_study_id|_trial_id|_backend)\b|_CachedStorage|storages\._", (REPO / f).read_text()
        )
    ]
    assert hits == ["search/storage/optuna_private.py"]


def test_the_retry_loop_lives_in_one_module() -> None:
    assert _files_matching(r"\bretrying\(") == ["search/storage/retry.py"]
