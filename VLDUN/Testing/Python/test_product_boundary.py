"""The product (what Slicer and `pip install vldun` get) stands without the lab and has no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PRODUCT = REPO / "VLDUN" / "VLDUNLib"
MODULES = sorted(p.stem for p in PRODUCT.glob("*.py") if p.stem != "__init__")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), relative ones resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "VLDUNLib" if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            if node.module is None:  # `from . import x`
                found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_product_file_imports_the_lab() -> None:
    offenders = {p.name: sorted(m for m in imported_modules(p) if m.split(".")[0] == "vldun_lab")
                 for p in [*PRODUCT.glob("*.py"), REPO / "VLDUN" / "VLDUN.py"]}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_product_imports_and_predicts_with_the_lab_made_unimportable(tmp_path: Path) -> None:
    script = f"""
import sys, importlib, importlib.abc

class NoLab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vldun_lab":
            raise ImportError("the lab is not installed")

sys.meta_path.insert(0, NoLab())
for name in {MODULES!r}:
    importlib.import_module("VLDUNLib." + name)
from VLDUNLib.cli import main
assert main(["train", "x.yaml"]) == 2
assert not [m for m in sys.modules if m.startswith("vldun_lab")]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    assert "pip install -e lab" in result.stderr


def test_the_product_has_no_import_cycles() -> None:
    graph = {name: {m.split(".")[1] for m in imported_modules(PRODUCT / f"{name}.py")
                    if m.startswith("VLDUNLib.") and m.split(".")[1] in MODULES} - {name}
             for name in MODULES}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in visiting:
            pytest.fail("import cycle: " + " -> ".join(visiting[visiting.index(name):] + [name]))
        if name in done:
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


@pytest.mark.slow
def test_the_wheel_holds_the_product_and_no_lab(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("vldun-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = {n for n in names if n.endswith(".py")}
    assert code == {f"VLDUNLib/{name}.py" for name in [*MODULES, "__init__"]}
    assert not [n for n in names if "vldun_lab" in n or n.endswith(".yaml")]
