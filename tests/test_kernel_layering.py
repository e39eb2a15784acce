"""The package's layers depend one way (issue 21): distsparse.kernels imports nothing else from
the package, masks builds on the kernels only, the distributed engine (distsparse.distributed)
builds on masks and the kernels only, and the integrations use only public names."""

from __future__ import annotations

import ast
import pathlib

import distsparse

PACKAGE = pathlib.Path(distsparse.__file__).parent


def _package_imports(path: pathlib.Path) -> set[str]:
    """Modules of the package that ``path`` imports (relative imports resolved), at any depth."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            out.update(n for n in names if n.split(".")[0] == "distsparse")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "distsparse")
    return out


def test_kernels_import_nothing_above_them():
    files = sorted((PACKAGE / "kernels").glob("*.py"))
    assert files
    for path in files:
        above = {m for m in _package_imports(path) if not m.startswith("distsparse.kernels")}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_masks_and_selection_depend_one_way():
    masks = _package_imports(PACKAGE / "masks.py")
    assert {m for m in masks if not m.startswith("distsparse.kernels")} == set(), masks
    assert "distsparse.masks" in _package_imports(PACKAGE / "distributed" / "selection.py")


def test_distributed_engine_sits_on_masks_and_kernels_only():
    files = sorted((PACKAGE / "distributed").glob("*.py"))
    assert len(files) >= 7, files  # __init__, comm, planner, selection, sharding, rects, step
    allowed = ("distsparse.distributed", "distsparse.masks", "distsparse.kernels")
    for path in files:
        above = {m for m in _package_imports(path) if not m.startswith(allowed)}
        assert not above, f"distributed/{path.name} imports {sorted(above)}"


def test_integrations_use_public_names_only():
    """No integration reaches into the engine (Comm, bit packing, rectangles) or a private name."""
    for path in sorted((PACKAGE / "integrations").glob("*.py")):
        for mod in _package_imports(path):
            assert not mod.startswith(("distsparse.distributed", "distsparse.masks", "distsparse.kernels")), \
                f"integrations/{path.name} imports {mod}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("distsparse")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"integrations/{path.name} imports private {private}"


def test_selection_reexports_the_radix_kernels():
    from distsparse.distributed import selection
    from distsparse.kernels import radix

    for name in radix.__all__:
        assert getattr(selection, name) is getattr(radix, name), name
