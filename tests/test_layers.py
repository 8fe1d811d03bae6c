"""The house: edgert's import graph has no cycles and no import runs from a lower layer to a
higher one, counting every import (inside functions too) and every module loaded by name.

The graph is read from the source with ``ast`` (nothing is imported), one node per module.
A *unit* is a top-level module or subpackage of ``edgert``; LAYERS places every unit, bottom
first. A unit may import units of lower layers only: never one above it, never a sibling on
its own line. docs/internals.md ("Layers") draws the same table, top first; a test holds the
two together.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgert"

# bottom first; the units on one line do not import each other
LAYERS: list[tuple[str, ...]] = [
    ("errors.py", "version.py", "align.py", "dtypes.py", "stats.py", "heap.py"),  # shared leaves
    ("config.py", "control/"),     # device config; wire protocol, service, client (no runtime)
    ("memory/",),                  # arena, slots, storage
    ("pack/",),                    # format, reader, writers, importers, pruning
    ("engines/",),                 # compute only
    ("weights/", "experts/", "kv/", "update/"),   # mechanisms: each a consumer of the
                                                  # arena; signed pack versions
    ("projection/",),              # the expert cache's offline projection and cost model
    ("kinds/", "server/", "recipes/"),  # the models; the fleet (server and device link);
                                        # the demo model recipes
    ("runtime.py",),
    ("__init__.py",),              # the public API: Runtime, Client, DeviceConfig, errors
    ("bench/",),                   # the benchmarks' measuring code
    ("cli/",),                     # every command: argument parsing and dispatch
    ("__main__.py",),              # python -m edgert
]


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)"""
    return {name: (p, is_pkg) for p in sorted(PACKAGE.rglob("*.py"))
            for name, is_pkg in [_module_name(p)]}


def _targets(node: ast.AST, mod: str, is_pkg: bool, known) -> list[str]:
    """The edgert modules one import statement (or import-by-name call) loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = mod.split(".")[:None if is_pkg else -1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # `from pkg import name` loads pkg.name when that is a module, else pkg
        return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                for a in node.names]
    # a string naming a module: importlib.import_module("edgert.x"), a registration table
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
            and node.value in known:
        return [node.value]
    return []


def import_graph() -> dict[str, set[str]]:
    """module -> the edgert modules it imports anywhere in its file."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, (path, is_pkg) in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for t in _targets(node, mod, is_pkg, known):
                if t.split(".")[0] != "edgert":
                    continue
                while t not in known:          # `import edgert.a.b.name` -> edgert.a.b
                    t = t.rsplit(".", 1)[0]
                if t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def unit(mod: str) -> str:
    """edgert.pack.reader -> "pack/", edgert.config -> "config.py", edgert -> "__init__.py"."""
    parts = mod.split(".")
    if len(parts) == 1:
        return "__init__.py"
    sub = PACKAGE / parts[1]
    return f"{parts[1]}/" if sub.is_dir() else f"{parts[1]}.py"


def layer_of() -> dict[str, int]:
    return {u: i for i, units in enumerate(LAYERS) for u in units}


def test_the_checker_sees_function_level_imports_and_cycles():
    # a cycle closed inside a function is still a cycle
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .prune import run_model\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _targets(node, "edgert.pack.importance", False, modules()) == ["edgert.pack.prune"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_unit_has_a_layer():
    placed = layer_of()
    assert len(placed) == sum(map(len, LAYERS)), "a unit is on two lines of LAYERS"
    units = {unit(m) for m in modules()}
    assert units - set(placed) == set(), "units missing from LAYERS"
    assert set(placed) - units == set(), "LAYERS names units that do not exist"


def test_no_import_runs_up_or_sideways():
    placed = layer_of()
    bad = []
    for mod, targets in import_graph().items():
        for t in targets:
            a, b = unit(mod), unit(t)
            if a != b and placed[b] >= placed[a]:
                bad.append(f"{mod} -> {t} ({a} layer {placed[a]}, {b} layer {placed[b]})")
    assert not bad, "imports from a lower layer to a higher one (or between siblings):\n" + \
        "\n".join(sorted(bad))


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_run_time_reads_only_the_cost_model_of_the_projection():
    """The offline replay (trace, replay, share) stays out of everything the Runtime can
    load; of the projection, the model layer reads the cost model's defaults only."""
    graph = import_graph()
    offline = {m for m in graph if m.startswith("edgert.projection.")} - \
        {"edgert.projection.costmodel"}
    assert _closure(graph, "edgert.runtime") & offline == set()
    assert not [m for m in graph if m.startswith("edgert.experts")
                and any(t.startswith("edgert.projection") for t in graph[m])]


def test_command_line_parsing_stays_in_cli():
    """The benchmarks measure; their options are parsed in cli/bench.py."""
    parsing = []
    for path in sorted((PACKAGE / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "argparse" for n in names):
                parsing.append(str(path.relative_to(ROOT)))
    assert not parsing, f"argparse outside cli/: {parsing}"


def test_no_empty_packages():
    def empty(pkg: Path) -> bool:   # no module of its own, no subpackage, a blank __init__
        inside = [q for q in pkg.iterdir() if q.name != "__init__.py" and
                  (q.suffix == ".py" or (q / "__init__.py").exists())]
        return not inside and not (pkg / "__init__.py").read_text().strip()
    found = [str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
             if empty(p.parent)]
    assert not found, f"empty packages: {found}"


def test_the_layer_picture_in_internals_matches():
    """docs/internals.md, section "Layers": a code block whose unindented lines start with
    the units of one layer, top first."""
    text = (ROOT / "docs" / "internals.md").read_text()
    section = text.split("## Layers", 1)[1]
    block = section.split("```", 2)[1]
    drawn = []
    for line in block.splitlines()[1:]:
        if not line or line[0].isspace():
            continue
        units = []
        for tok in line.split():
            if not re.fullmatch(r"[\w]+(/|\.py)", tok):
                break
            units.append(tok)
        drawn.append(tuple(units))
    assert drawn == [tuple(units) for units in reversed(LAYERS)]
