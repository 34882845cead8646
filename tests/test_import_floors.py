"""The lower floors of the package import only downward (docs/parallelism.md and the package
doc): kernels <- parallel <- layers. A module of a floor that imports a package of a higher one
(e.g. parallel/ importing models/, as parallel/context.py once did for the layer spec) ties the
floors into an import circle; this test names the module and the import."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# floor -> (its folder, the megatron_hybrid packages it may import)
BASE = {"megatron_hybrid.errors", "megatron_hybrid.mcore"}
FLOORS = {
    "kernels": (ROOT / "kernels", {"megatron_hybrid.kernels", "megatron_hybrid.errors"}),
    "parallel": (
        ROOT / "megatron_hybrid" / "parallel",
        BASE | {"megatron_hybrid.kernels", "megatron_hybrid.parallel"},
    ),
    "layers": (
        ROOT / "megatron_hybrid" / "layers",
        BASE | {"megatron_hybrid.kernels", "megatron_hybrid.parallel", "megatron_hybrid.layers"},
    ),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a megatron_hybrid module in ``path``, at any depth
    (imports inside functions count: they are the usual way to hide a cycle)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names[:1] if n.startswith("megatron_hybrid")]
            if node.module == "megatron_hybrid":  # from megatron_hybrid import mcore
                out += [(node.lineno, n) for n in names[1:]]
        elif isinstance(node, ast.Import):
            out += [
                (node.lineno, a.name) for a in node.names if a.name.startswith("megatron_hybrid")
            ]
    return [(line, m) for line, m in out if m != "megatron_hybrid"]


def allowed(module: str, prefixes: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_lower_floors_import_only_downward():
    upward = []
    for floor, (folder, ok) in FLOORS.items():
        for path in sorted(folder.rglob("*.py")):
            for line, module in imported_modules(path):
                if not allowed(module, ok):
                    upward.append(f"{path.relative_to(ROOT)}:{line} ({floor}) imports {module}")
    assert not upward, "\n".join(upward)
