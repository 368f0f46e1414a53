"""The core of the Slicer module's self-test, with slicer-core: the real worker and the shipped weights."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from VLDUNLib import selftest


def test_self_test_restores_and_segments_the_phantom(scene: Any) -> None:
    lines = selftest.run_self_test(scene)
    print("\n" + "\n".join(lines))
    assert "geometry equal to the input" in lines[0]
    assert "named segments" in lines[-1] or "no segmentation" in lines[-1]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_self_test_without_torch_says_it_did_not_run() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import slicer\n"
        "from VLDUNLib import selftest\n"
        "try:\n"
        "    selftest.run_self_test(slicer.vtkMRMLScene())\n"
        "except selftest.SelfTestNotRun as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("VL-DUN self-test NOT RUN: the Python packages torch are missing")

