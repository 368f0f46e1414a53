"""The Slicer module, its ctest file and the product library work on Python 3.9 (3D Slicer 5.8), checked by vermin.

vermin finds standard-library members and syntax newer than 3.9. Its union-type detection (`X | Y`) also
reports annotations, which `from __future__ import annotations` keeps as strings that Python 3.9 never
evaluates; those are dropped here, and every other `X | Y` (a runtime use, or an annotation in a file
without that import, such as VLDUN.py whose annotations parameterNodeWrapper and `def` evaluate) fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
LIBRARY = MODULE_DIR / "VLDUNLib"
CHECKED = [MODULE_DIR / "VLDUN.py", *sorted(LIBRARY.glob("*.py")), Path(__file__).with_name("test_slicer_module_files.py")]
"""The module and the whole product library (the lab, which Slicer never runs, is outside it)."""
TARGET = "3.9"
UNION = "union types as `X | Y`"


def vermin(*options: str, paths: list[Path] = CHECKED) -> list[tuple[Path, int, str]]:
    """(file, line, feature) of every finding newer than TARGET."""
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", f"-t={TARGET}-", "--violations", "--no-tips", "--format", "parsable",
               *options, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "No module named 'vermin'" not in result.stderr, "install the test extra: pip install -e '.[test]'"
    findings = []
    for line in result.stdout.splitlines():
        path, number, _, _, _, feature = line.split(":", 5)
        if path and number:
            findings.append((Path(path), int(number), feature))
    return findings


def postponed_annotation_lines(path: Path) -> set[int]:
    """Lines of annotations that stay strings: every annotation of a file with `from __future__ import annotations`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    if not postponed:
        return set()
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return {line for a in annotations for line in range(a.lineno, a.end_lineno + 1)}


def test_the_checked_files_are_the_whole_product() -> None:
    names = {path.stem for path in CHECKED}
    assert {"VLDUN", "logic", "job", "worker", "inference", "mrml", "results", "network", "weights", "cli"} <= names


def test_nothing_needs_a_python_newer_than_3_9() -> None:
    findings = vermin()
    assert findings == [], "\n".join(f"{path}:{line}: {feature}" for path, line, feature in findings)


def test_no_union_type_is_evaluated_at_run_time() -> None:
    findings = [(path, line) for path, line, feature in vermin("--feature", "union-types") if feature == UNION]
    runtime = [(path, line) for path, line in findings if line not in postponed_annotation_lines(path)]
    assert runtime == [], "\n".join(f"{path}:{line}: X | Y is evaluated on Python 3.9" for path, line in runtime)


def test_the_check_sees_runtime_unions_and_skips_postponed_annotations(tmp_path: Path) -> None:
    """Guards the filter above: a postponed annotation passes, the same union evaluated at run time does not."""
    postponed = tmp_path / "postponed.py"
    postponed.write_text("from __future__ import annotations\n\ndef f(x: int | None) -> str | None:\n    return None\n")
    evaluated = tmp_path / "evaluated.py"
    evaluated.write_text("def f(x: int | None) -> None:\n    return isinstance(x, int | str)\n")
    findings = [(p, n) for p, n, f in vermin("--feature", "union-types", paths=[postponed, evaluated]) if f == UNION]
    runtime = {p.name for p, n in findings if n not in postponed_annotation_lines(p)}
    assert runtime == {"evaluated.py"}
