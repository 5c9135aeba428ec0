"""The layering docs/design.md draws: builders write artifacts, backends read them, neither imports the other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vae_rt"
BUILDERS = ("vae_rt.export", "vae_rt.engine", "vae_rt.triton", "vae_rt.quantize", "vae_rt.build")


def imported_modules(path: Path) -> set[str]:
    """Every vae_rt module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vae_rt"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vae_rt"))
    return found


def test_imported_modules_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from vae_rt.export import export_onnx\n")
    assert "vae_rt.export" in imported_modules(module)


@pytest.mark.parametrize("path", sorted((PACKAGE / "backends").glob("*.py")), ids=lambda p: p.name)
def test_backends_never_import_builders(path):
    assert not {m for m in imported_modules(path) if m.startswith(BUILDERS)}


@pytest.mark.parametrize("module", BUILDERS)
def test_builders_never_import_backends(module):
    path = PACKAGE / f"{module.removeprefix('vae_rt.')}.py"
    assert not {m for m in imported_modules(path) if m.startswith(("vae_rt.backends", "vae_rt.sampler", "vae_rt.resolve"))}
