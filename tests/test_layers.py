"""The package's layers hold: no import cycle, and no lower layer imports a higher one.

Layers, lowest first: the core modules (config, schema, storage, faults, manifest, loop, timing, console); pipelines/,
tokenize/, bpe/; model/; jobs/; the CLI. Every import counts, inside functions too: a deferred
import of a higher layer is still a dependency on it.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tessera")
LAYERS = {"config": 0, "schema": 0, "storage": 0, "faults": 0, "manifest": 0, "loop": 0, "timing": 0, "console": 0, "pipelines": 1, "tokenize": 1, "bpe": 1,
          "model": 2, "jobs": 3, "cli": 4}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself (tessera/__init__.py)
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: not in any layer; add it to LAYERS")
    return LAYERS[parts[1]]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            module = ("tessera." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")).removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tessera":
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.split(".")[0] == "tessera"}
            graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_and_no_lower_layer_imports_a_higher_one():
    graph = import_graph()
    assert len(graph) > 40 and "tessera.jobs.train" in graph and "tessera.bpe.fit" in graph
    upward = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert upward == []
    assert cycles(graph) == []


def test_the_checks_catch_what_they_are_for():
    with pytest.raises(AssertionError):
        layer("tessera.unknown_module")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("tessera.model.unified") > layer("tessera.bpe.model") > layer("tessera.storage")


def test_job_functions_stay_short():
    """A job reads like its docstring diagram: named steps, none over ~50 lines (STYLE.md)."""
    long = []
    for name in sorted(os.listdir(os.path.join(PACKAGE, "jobs"))):
        if name.endswith(".py"):
            path = os.path.join(PACKAGE, "jobs", name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                    long.append(f"jobs/{name}::{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


RAY_ADAPTERS = {"tessera.bpe.distributed", "tessera.pipelines.readers"}  # Ray Data datasources, BPE shard actors


def test_only_the_ray_adapters_import_ray():
    """The library is Ray-free (STYLE.md: the Ray parts are adapters over it): outside jobs/, only the
    shard actors of the BPE fit and the Ray Data datasources import Ray. The fit loop itself does not;
    its caller picks the shard backend."""
    importers = set()
    for directory, _, files in os.walk(PACKAGE):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(directory, name)
            module = ("tessera." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")).removesuffix(".__init__")
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if any(n.split(".")[0] == "ray" for n in names):
                    importers.add(module)
    assert "tessera.jobs.train" in importers
    assert {m for m in importers if not m.startswith("tessera.jobs.")} == RAY_ADAPTERS
