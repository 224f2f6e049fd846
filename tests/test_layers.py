"""Imports go one way, downwards (DESIGN.md's layout): a module may import its own layer or
any layer below it, never one above. Function-level imports count too.

    cli → api → runtime, jobs → families → training, poetry, images, music → models → storage
        → safety → config, common
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atelier"

LAYERS = [
    {"cli"},
    {"api", "studio"},
    {"runtime", "jobs"},
    {"families"},
    {"training", "poetry", "images", "music"},
    {"models"},
    {"storage"},
    {"safety"},
    {"config", "common", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def package_of(module: str) -> str:
    """'atelier.runtime.manager' → 'runtime'; 'atelier.config' → 'config'; 'atelier' → '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every `import atelier…` and `from atelier… import …` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "atelier":
            if node.module == "atelier":  # `from atelier import x`: x is a package, or a name in __init__
                found += [(node.lineno, f"atelier.{a.name}" if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists() else "atelier") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "atelier"]
    return found


def source_files():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in source_files()}
    assert packages <= set(RANK), f"packages without a layer in this test: {sorted(packages - set(RANK))}"


def test_imports_go_downwards():
    upward = []
    for path in source_files():
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for line, module in imports(path):
            there = package_of(module)
            if RANK[there] < RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {module} ({there})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_packages_of_one_layer_do_not_import_each_other_both_ways():
    edges = set()
    for path in source_files():
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        edges |= {(here, package_of(m)) for _, m in imports(path) if package_of(m) != here}
    cycles = sorted(f"{a} ⇄ {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, f"packages importing each other: {cycles}"


def test_routes_do_not_import_routes():
    routes = PACKAGE / "api" / "routes"
    bad = [f"{p.name}:{line} imports {m}" for p in routes.glob("*.py") for line, m in imports(p)
           if m.startswith("atelier.api.routes")]
    assert not bad, "shared code belongs a layer down, not in another route:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The parser sees imports inside functions too (the kind that slipped through before)."""
    f = tmp_path / "m.py"
    f.write_text("def load():\n    from atelier.runtime.manager import ModelManager\n    return ModelManager\n")
    assert imports(f) == [(2, "atelier.runtime.manager")]
