"""The module's self-test without Qt: a small built-in volume through the worker process and the shipped weights.

The Slicer module's test (VLDUN.py) and pytest (with slicer-core) both call `run_self_test`, so the
same checks run in Slicer and on a build machine. Without torch it raises `SelfTestNotRun`, never passes.
"""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util

from . import mrml
from .logic import VLDUNLogic, missing_dependencies

SHAPE = (8, 64, 64)
"""(K, J, I): 8 slices of 64 x 64, a few seconds on a CPU."""
SPACING = (1.5, 1.5, 4.0)
ORIGIN = (-48.0, -40.0, 12.0)


class SelfTestNotRun(RuntimeError):
    """The self-test could not run here (missing packages); the message says what to install."""


def phantom(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A noisy bright disc with a darker ring and a bright core in every slice: an image with structure to segment."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    radius = np.hypot((j - shape[1] / 2) / shape[1], (i - shape[2] / 2) / shape[2]) + 0 * k
    image = np.where(radius < 0.4, 400.0, 20.0) - np.where(radius < 0.25, 150.0, 0.0) + np.where(radius < 0.1, 300.0, 0)
    noise = np.random.default_rng(0).normal(0.0, 25.0, shape)
    return (image + noise).astype(np.float32)


def add_phantom(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLScalarVolumeNode:
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "VL-DUN self-test phantom")
    slicer.util.updateVolumeFromArray(node, phantom())
    node.SetSpacing(*SPACING)
    node.SetOrigin(*ORIGIN)
    return node


def run_self_test(scene: slicer.vtkMRMLScene, device: str = "cpu") -> list[str]:
    """Restore and segment the phantom in `scene` with the shipped weights; raise AssertionError on a wrong result.

    Returns what was checked, one line each, for the test log.
    """
    missing = missing_dependencies()
    if missing:
        raise SelfTestNotRun(
            f"VL-DUN self-test NOT RUN: the Python packages {', '.join(missing)} are missing. Open the module and "
            "press Apply once to install them, then run the test again."
        )
    source = add_phantom(scene)
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "VL-DUN self-test restored")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "VL-DUN self-test segmentation")
    detection = VLDUNLogic().process(source, restored, segmentation, device=device)

    assert mrml.volume_geometry(restored) == mrml.volume_geometry(source), "restored geometry differs from the input"
    voxels = slicer.util.arrayFromVolume(restored)
    assert np.isfinite(voxels).all(), "the restored volume has NaN or infinite voxels"
    content = segmentation.GetSegmentation()
    names = [content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())]
    assert names == detection.segment_names, f"segments {names} differ from the detected classes"
    lines = [
        f"restored volume {voxels.shape[::-1]} voxels, geometry equal to the input, values finite",
        (f"detected {detection.modality} ({detection.modality_probability:.0%}), "
         f"{detection.degradation} ({detection.degradation_probability:.0%})"),
    ]
    if names:
        lines.append(f"segmentation node with {len(names)} named segments: {', '.join(names)}")
    else:
        lines.append("no segmentation: the model reported no classes for this image")
    return lines
