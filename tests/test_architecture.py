"""The layout's rules, checked on the source: no import cycles between goose's modules (lazy imports inside
functions count: they only hide a cycle), and one implementation of each piece of shared plumbing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "pipeline", "student")


def source_modules() -> dict[str, Path]:
    """goose's modules by dotted name (relative to the package root), tests and benches excluded."""
    files = [p for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    for pkg in PACKAGES:
        files += list((ROOT / pkg).rglob("*.py"))
    out = {}
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The goose modules `name` imports anywhere in its file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("goose"):
                    continue
                base = (node.module or "").split(".")[1:]
            else:
                base = (here[: len(here) - node.level + 1] if node.level > 1 else here) + \
                    (node.module.split(".") if node.module else [])
            targets = [".".join(base + [a.name]) for a in node.names] + [".".join(base)]
        elif isinstance(node, ast.Import):
            targets = [".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("goose.")]
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    # a package's __init__ importing its own modules is not a cycle with them: leave package edges out
    return {name: {t for t in imports_of(name, path, modules) if not name.startswith(t + ".") and
                   not t.startswith(name + ".")} for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["pipeline.stage_two.train"]  # the walk found the tree
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_lazy_cycle():
    graph = import_graph()
    graph["pipeline.stage_two.config"] = graph["pipeline.stage_two.config"] | {"pipeline.stage_two.train"}
    assert any("pipeline.stage_two.config" in c and "pipeline.stage_two.train" in c for c in cycles(graph))


def _files_containing(text: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in source_modules().values() if text in p.read_text())


def test_one_implementation_of_each_piece_of_plumbing():
    assert _files_containing("os.O_EXCL") == ["locks.py"]  # the one process lock
    assert _files_containing("init_process_group") == ["ranks.py"]  # the one torchrun helper
    assert _files_containing("dist.all_reduce(") == ["ranks.py"]  # every mean/sum over ranks
    assert _files_containing("0.6931") == ["numerics.py"]  # log1mexp
    assert _files_containing("def teacher_bucket_logprobs") == ["pipeline/stage_two/losses/buckets.py"]


STAGE_ONE_ENTRY_POINTS = {"pipeline.stage_one.cache_teacher", "pipeline.stage_one.config"}


def stage_one_reached_from_outside(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Modules outside stage one that import more of it than its recipe and config."""
    return {name: deps for name, deps in (
        (name, {t for t in targets if t.startswith("pipeline.stage_one") and t not in STAGE_ONE_ENTRY_POINTS
                and t != "pipeline.stage_one"})
        for name, targets in graph.items() if not name.startswith("pipeline.stage_one")) if deps}


def test_shared_teacher_and_data_code_lives_outside_stage_one():
    """Loading a teacher and reading a corpus serve eval, the harness, quickstart and stage two too: they live
    in pipeline/ (teacher, data, devices), and nothing reaches into stage one for them."""
    graph = import_graph()
    assert {"pipeline.teacher", "pipeline.data", "pipeline.devices"} <= set(graph)
    assert stage_one_reached_from_outside(graph) == {}
    graph["pipeline.evaluate"] = graph["pipeline.evaluate"] | {"pipeline.stage_one.targets"}  # the check bites
    assert stage_one_reached_from_outside(graph) == {"pipeline.evaluate": {"pipeline.stage_one.targets"}}
