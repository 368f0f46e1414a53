"""Shared fixtures: a real MRML scene (slicer-core) that fails the test on any VTK error, volume nodes
with chosen geometry, and a fake predictor with `VolumePredictor.predict`'s contract.

slicer, vtk and the inference module are imported inside the fixtures, so test files that use none
of them do not pay for the imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

FAKE_CLASSES = ("ACDC/RV", "ACDC/MYO", "ACDC/LV")
FAKE_TASKS = {"heart": "Heart: ventricles and myocardium"}


def rotation(x_degrees: float, y_degrees: float) -> np.ndarray:
    """Rotation about the R axis, then about the A axis: an oblique IJK->RAS direction matrix."""
    a, b = math.radians(x_degrees), math.radians(y_degrees)
    about_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return about_y @ about_x


@pytest.fixture
def oblique() -> np.ndarray:
    """Directions rotated 30 degrees about R and 30 degrees about A: no axis is aligned with RAS."""
    return rotation(30, 30)


@pytest.fixture
def vtk_errors() -> Iterator[list[str]]:
    """Messages of VTK ErrorEvents during the test (VTK errors only print); any left at the end fail it."""
    import vtk

    errors: list[str] = []

    def on_error(caller: Any, event: str, message: str) -> None:
        errors.append(message)

    on_error.CallDataType = vtk.VTK_STRING
    window = vtk.vtkOutputWindow.GetInstance()
    tag = window.AddObserver(vtk.vtkCommand.ErrorEvent, on_error)
    try:
        yield errors
    finally:
        window.RemoveObserver(tag)
    if errors:
        pytest.fail("VTK reported errors:\n" + "\n".join(errors))


@pytest.fixture
def scene(vtk_errors: list[str]) -> Any:
    """An empty MRML scene; a VTK error anywhere in the test fails it."""
    import slicer

    return slicer.vtkMRMLScene()


@pytest.fixture
def add_volume(scene: Any) -> Callable[..., Any]:
    """add_volume(array (K, J, I), spacing=(I, J, K), origin, directions 3x3, name, class_name) -> node in `scene`."""
    import slicer

    def add(
        array: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        directions: np.ndarray | None = None,
        name: str = "volume",
        class_name: str = "vtkMRMLScalarVolumeNode",
    ) -> Any:
        node = scene.AddNewNodeByClass(class_name, name)
        slicer.util.updateVolumeFromArray(node, array)
        node.SetSpacing(*spacing)
        node.SetOrigin(*origin)
        node.SetIJKToRASDirections((np.eye(3) if directions is None else directions).tolist())
        return node

    return add


class FakePredictor:
    """`VolumePredictor.predict` without a network: a 3-tap smoothing and three intensity classes.

    Honours batches, progress and should_cancel exactly as the real predictor does, and keeps what it
    saw and returned for the tests to compare with the nodes.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.batches = 0
        self.mirror = False
        self.mirrored: list[bool] = []
        self.seen: np.ndarray | None = None
        self.last: Any = None
        self.task: str | None = None

    def tasks(self) -> dict[str, str]:
        return dict(FAKE_TASKS)

    def predict(
        self,
        volume: np.ndarray,
        *,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        degradation_override: str | None = None,
        task: str = "auto",
    ) -> Any:
        from VLDUNLib.inference import Cancelled, Detection, Prediction, SegmentClass
        from VLDUNLib.terminology import display_name

        self.calls += 1
        self.task = task
        self.mirrored.append(self.mirror)
        self.seen = volume
        edges = np.quantile(volume, [0.25, 0.5, 0.75])
        restored = np.empty(volume.shape, np.float32)
        labels = np.zeros(volume.shape, np.uint8)
        for start in range(0, len(volume), batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled by the test")
            stop = min(start + batch_size, len(volume))
            batch = np.asarray(volume[start:stop], np.float32)
            restored[start:stop] = (batch + np.roll(batch, 1, axis=-1) + np.roll(batch, 1, axis=-2)) / 3
            labels[start:stop] = np.digitize(batch, edges)
            self.batches += 1
            if progress is not None:
                progress(stop, len(volume))
        segments = [SegmentClass(i + 1, display_name(key), key) for i, key in enumerate(FAKE_CLASSES)]
        detection = Detection(
            "ACDC/MRI", 0.9, {"ACDC/MRI": 0.9}, degradation_override or "noise", 0.8, {"noise": 0.8}, False, segments,
            task="heart",
        )
        self.last = Prediction(restored, labels, detection)
        return self.last


@pytest.fixture
def fake_predictor() -> FakePredictor:
    return FakePredictor()
