"""The package's floors import only downward, and its modules import no circle (docs/architecture.md).

Every module of megatron_hybrid/, kernels/ (installed as megatron_hybrid.kernels) and tools/ is
read with ``ast``; every import of one of our modules, at any depth (imports inside functions
count: they are the usual way to hide an upward arrow or a circle), must go to the module's own
room or to a lower floor. Rooms that share a floor (training and inference; parallel and data)
do not import each other. A module that imports upward, or a new module the table does not
place, fails the test with its file, line and import.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# The floors, top to bottom: the order a newcomer reads the code in, from what the user runs down
# to the kernels (docs/architecture.md holds the same table; keep them together). A module
# belongs to the room of the longest prefix that names it; it may import its own room and any
# room of a lower floor, never a higher floor nor another room of its own floor.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry points",
        (
            "tools",  # the command-line scripts
            "megatron_hybrid.train",  # megatron-hybrid-train
            "megatron_hybrid.demo",  # the CPU demo (train, then generate)
            "megatron_hybrid.inference.cli",  # tools/generate.py's command line
        ),
    ),
    (
        "conversion | science",
        (
            "megatron_hybrid.conversion",  # HF export/import, checkpoints -> model
            "megatron_hybrid.science",  # expressivity grid, scaling ladder: runs of the trainer
        ),
    ),
    ("training | inference", ("megatron_hybrid.training", "megatron_hybrid.inference")),
    ("models", ("megatron_hybrid.models",)),  # config, presets, specs, init, HF name mapping
    ("layers", ("megatron_hybrid.layers",)),
    ("parallel | data", ("megatron_hybrid.parallel", "megatron_hybrid.data")),
    ("mcore", ("megatron_hybrid.mcore",)),  # the one place that imports megatron-core internals
    ("kernels", ("megatron_hybrid.kernels",)),  # megatron-free: torch and Triton only
    ("errors", ("megatron_hybrid.errors",)),  # the error types every floor raises
)

# Floors whose modules form one room (they may import each other): the entry points.
ONE_ROOM = {"entry points"}

# Upward imports that are accepted, (importing module, imported module) -> why. Keep it empty:
# move the code instead.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

# Circles through imports inside functions (each module imports the other only when called, so
# importing works, but the two read as one). Module-level circles are never accepted.
ALLOWED_LAZY_CIRCLES: dict[frozenset[str], str] = {
    frozenset({"megatron_hybrid.training.config", "megatron_hybrid.training.cli"}): (
        "config.py checks a run config against cli.py's MEGATRON_FLAGS table, and cli.py builds "
        "the run config; the flag table could move to a module of its own"
    ),
    frozenset({"megatron_hybrid.training.preflight", "megatron_hybrid.training.loop"}): (
        "preflight.py (--dry-run) resolves the vocabulary with loop.py's resolve_vocab, and the "
        "loop runs preflight's context-parallel check; resolve_vocab could move out of loop.py"
    ),
}

FOLDERS = (ROOT / "megatron_hybrid", ROOT / "kernels", ROOT / "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # setup.py installs the top-level kernels/ as megatron_hybrid.kernels
        parts.insert(0, "megatron_hybrid")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(p): p
        for folder in FOLDERS
        for p in sorted(folder.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = all_modules()


def ours(name: str) -> str | None:
    """The module of ours that importing ``name`` runs (None if it is not ours)."""
    if name == "kernels" or name.startswith("kernels."):  # tests and tools use this name too
        name = "megatron_hybrid." + name
    if not (name == "megatron_hybrid" or name.startswith("megatron_hybrid.")):
        return None
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _statements(tree: ast.AST, module_level: bool):
    """Import statements of a module; with ``module_level``, only those run when it is imported
    (not inside a function)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        skip = module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if not skip:
            stack.extend(ast.iter_child_nodes(node))


def imports(module: str, module_level: bool = False) -> list[tuple[int, str]]:
    """(line, imported module of ours) of every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _statements(ast.parse(path.read_text()), module_level):
        if isinstance(node, ast.Import):
            targets = [ours(a.name) for a in node.names]
        else:
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            # ``from pkg import name`` runs pkg.name when that is a module, else pkg
            targets = [ours(f"{base}.{a.name}") for a in node.names]
        out += [(node.lineno, t) for t in targets if t is not None and t != "megatron_hybrid"]
    return sorted(set(out))


def room(module: str) -> tuple[int, str] | None:
    """(floor index from the top, room prefix) of ``module``, or None if the table lacks it."""
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (
                best is None or len(p) > len(best[1])
            ):
                best = (i, p)
    if best is not None and FLOORS[best[0]][0] in ONE_ROOM:
        best = (best[0], FLOORS[best[0]][0])
    return best


def test_the_floors_table_places_every_module():
    unplaced = [m for m in MODULES if m != "megatron_hybrid" and room(m) is None]
    assert not unplaced, f"modules no floor names (add them to FLOORS): {unplaced}"


def test_every_import_goes_down_or_stays_in_its_room():
    bad = []
    for module in MODULES:
        here = room(module)
        if here is None:
            continue
        for line, target in imports(module):
            there = room(target)
            if there is None or there[1] == here[1] or there[0] > here[0]:
                continue
            if (module, target) in ALLOWED_UPWARD:
                continue
            kind = "upward" if there[0] < here[0] else "sideways, same floor"
            bad.append(
                f"{MODULES[module].relative_to(ROOT)}:{line} ({FLOORS[here[0]][0]}) imports "
                f"{target} ({FLOORS[there[0]][0]}): {kind}"
            )
    assert not bad, "\n".join(bad)


def circles(module_level: bool) -> list[list[str]]:
    """The strongly connected components (more than one module) of our import graph."""
    graph = {m: sorted({t for _, t in imports(m, module_level) if t != m}) for m in MODULES}
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):  # Tarjan
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    return found


def test_no_import_circle_at_module_level():
    """Modules that import each other when imported: which one runs first decides what the other
    sees (half-initialised modules, ImportError by import order)."""
    found = circles(module_level=True)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_circle_through_functions_beyond_the_known_ones():
    found = circles(module_level=False)
    new = [c for c in found if frozenset(c) not in ALLOWED_LAZY_CIRCLES]
    assert not new, "import circles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in new
    )
    gone = set(ALLOWED_LAZY_CIRCLES) - {frozenset(c) for c in found}
    assert not gone, f"untied circles still listed in ALLOWED_LAZY_CIRCLES: {gone}"


def test_the_checks_see_what_they_check():
    """The reader finds the imports it must: a from-import of a module inside a function, a
    relative import in kernels/, ``from megatron_hybrid import mcore``."""
    inside_a_function = "megatron_hybrid.inference.decoder"  # hf_export's compare_greedy
    assert any(t == inside_a_function for _, t in imports("megatron_hybrid.conversion.hf_export"))
    assert all(
        t != inside_a_function
        for _, t in imports("megatron_hybrid.conversion.hf_export", module_level=True)
    )
    assert any(
        t == "megatron_hybrid.kernels.doc_boundaries"
        for _, t in imports("megatron_hybrid.kernels.conv_triton", module_level=True)
    )
    assert any(t == "megatron_hybrid.mcore" for _, t in imports("megatron_hybrid.layers.norms"))
    assert room("megatron_hybrid.inference.cli")[1] == "entry points"
    assert room("megatron_hybrid.inference.session")[1] == "megatron_hybrid.inference"
