"""What the logic refuses before any work: input volumes it cannot restore, outputs it must not overwrite,
options it does not know. Each check raises ValueError with one line that names the problem and the fix.

Shared by `logic` (synchronous runs) and `job` (the worker process), without importing either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import slicer
import slicer.util

from . import mrml
from .tasks import AUTO

if TYPE_CHECKING:
    from .results import Prediction


MIN_IN_PLANE = 16
"""Smallest slice the network can take: its encoder halves the image several times."""

MULTI_COMPONENT_VOLUMES = ("vtkMRMLTensorVolumeNode", "vtkMRMLMultiVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode")
"""Volume classes with several values per voxel (vector and RGB volumes derive from the tensor class)."""


class Predictor(Protocol):
    """What `process` needs from a model: `inference.VolumePredictor`, or a test double."""

    mirror: bool
    """Average the segmentation over each slice and its 3 mirror images (test-time mirroring)."""

    def predict(
        self,
        volume: np.ndarray,
        *,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        degradation_override: str | None = None,
        task: str = AUTO,
    ) -> Prediction: ...

    def tasks(self) -> dict[str, str]:
        """Task id -> readable label: the choices for `predict(task=...)` besides "auto"."""


def _node_label(node: slicer.vtkMRMLNode) -> str:
    return f"'{node.GetName()}'"


def _check_volume_type(node: slicer.vtkMRMLNode) -> None:
    """Only plain scalar volumes hold one grey value per voxel; name what to pick for the others."""
    name = _node_label(node)
    if node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"{name} is a segmentation, not an image; select the image volume it was drawn on.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(
            f"{name} is a labelmap (label values, not an image); select the grey-level image volume instead."
        )
    if any(node.IsA(kind) for kind in MULTI_COMPONENT_VOLUMES):
        raise ValueError(
            f"{name} is a {node.GetClassName()} (colour, vector or multi-frame voxels); VL-DUN needs a "
            "single-component image: convert it with the 'Vector to Scalar Volume' module or select one frame."
        )
    if node.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise ValueError(f"{name} is a {node.GetClassName()}, not an image volume; select a scalar volume.")


def _check_not_sequence_frame(node: slicer.vtkMRMLScalarVolumeNode) -> None:
    """A 4-D series shows one frame in a proxy node whose voxels change with the browser's frame."""
    for browser in _nodes_of_class(node.GetScene(), "vtkMRMLSequenceBrowserNode"):
        if browser.IsProxyNodeID(node.GetID()):
            raise ValueError(
                f"{_node_label(node)} is the current frame of the 4-D sequence '{browser.GetName()}'; "
                "select the frame to process in the Sequences module, clone it (Data module: right-click > "
                "Clone) and select the clone."
            )


def _nodes_of_class(scene: slicer.vtkMRMLScene, class_name: str) -> list[slicer.vtkMRMLNode]:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def _check_voxels(node: slicer.vtkMRMLScalarVolumeNode) -> None:
    image = node.GetImageData()
    if image is None or 0 in image.GetDimensions():
        raise ValueError(f"{_node_label(node)} has no voxels; load the image data first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"{_node_label(node)} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "convert it to one with the 'Vector to Scalar Volume' module."
        )


def _check_size(node: slicer.vtkMRMLScalarVolumeNode, shape: tuple[int, ...]) -> None:
    in_plane = [size for axis, size in enumerate(shape) if axis != mrml.slice_axis(node)]
    if min(in_plane) < MIN_IN_PLANE:
        raise ValueError(
            f"{_node_label(node)} is only {in_plane[0]}x{in_plane[1]} voxels per slice; the network needs at "
            f"least {MIN_IN_PLANE}x{MIN_IN_PLANE}: select a larger volume or resample it finer "
            "('Resample Scalar Volume' module)."
        )


def _count_non_finite(array: np.ndarray) -> int:
    """Slice by slice, so a large volume never needs a full-size boolean mask."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return sum(int(np.count_nonzero(~np.isfinite(plane))) for plane in array)


def _check_values(node: slicer.vtkMRMLScalarVolumeNode, array: np.ndarray) -> None:
    bad = _count_non_finite(array)
    if bad:
        raise ValueError(
            f"{_node_label(node)} has {bad} NaN or infinite voxels; replace them first, e.g. in the Python "
            "console: a = slicer.util.arrayFromVolume(v); a[~numpy.isfinite(a)] = 0; "
            "slicer.util.arrayFromVolumeModified(v)."
        )
    low, high = array.min(), array.max()
    if low == high:
        raise ValueError(
            f"All voxels of {_node_label(node)} have the value {low}: there is no image to restore or segment; "
            "select the volume that holds the scan."
        )


def validate_input(node: slicer.vtkMRMLNode | None) -> None:
    """Refuse an input VL-DUN cannot process, with a ValueError naming the problem and the fix.

    Reads only; call it before creating or changing anything.
    """
    if node is None:
        raise ValueError("No input volume is selected; select the scalar image volume to restore and segment.")
    _check_volume_type(node)
    if node.GetScene() is None:
        raise ValueError(f"{_node_label(node)} is not in a scene; add it to the scene first.")
    _check_not_sequence_frame(node)
    _check_voxels(node)
    array = slicer.util.arrayFromVolume(node)
    _check_size(node, array.shape)
    _check_values(node, array)


def validate_outputs(
    input_volume: slicer.vtkMRMLScalarVolumeNode,
    output_volume: slicer.vtkMRMLNode | None,
    output_segmentation: slicer.vtkMRMLNode | None,
    replace_segments: bool = False,
) -> None:
    """The outputs must exist, be of the right kind, live in the input's scene and not be the input; the
    segmentation must hold no finished segments, nor (unless `replace_segments`) segments VL-DUN did not make."""
    if output_volume is None or output_volume.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise ValueError("Select or create a scalar volume node as the output (restored) volume.")
    if output_segmentation is None or not output_segmentation.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("Select or create a segmentation node as the output segmentation.")
    if output_volume is input_volume:
        raise ValueError(
            "The output volume is the input volume, which would be overwritten; choose 'Create new volume' as output."
        )
    for node in (output_volume, output_segmentation):
        if node.GetScene() is not input_volume.GetScene():
            raise ValueError(
                f"The output {_node_label(node)} is not in the input's scene; add it there (scene.AddNode) first."
            )
    _check_not_completed(output_segmentation)
    if not replace_segments:
        _check_no_foreign_segments(output_segmentation)


def _segment_list(segmentation: slicer.vtkMRMLSegmentationNode) -> list[slicer.vtkSegment]:
    content = segmentation.GetSegmentation()
    return [content.GetNthSegment(i) for i in range(content.GetNumberOfSegments())]


def foreign_segments(segmentation: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """Names of the segments VL-DUN did not make (drawn by hand, imported, from another tool).

    VL-DUN tags the segments it makes (`mrml.MODEL_TAG`); a run replaces all segments of its output, so
    these would be lost without a word.
    """
    return [segment.GetName() for segment in _segment_list(segmentation) if not segment.HasTag(mrml.MODEL_TAG)]


def _check_no_foreign_segments(segmentation: slicer.vtkMRMLSegmentationNode) -> None:
    others = foreign_segments(segmentation)
    if others:
        raise ValueError(
            f"The output segmentation {_node_label(segmentation)} holds segments VL-DUN did not make "
            f"({', '.join(others)}), which a run would delete. Choose 'Create new segmentation' as the output, "
            "or confirm replacing them (replace_segments=True)."
        )


def completed_segments(segmentation: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """Names of the segments marked "Completed" in the Segment Editor's status column.

    Slicer has no lock on volume or segmentation nodes; "Completed" is how a reviewer marks a segment as
    finished (corrected by hand), so a re-run must not replace it.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    return [s.GetName() for s in _segment_list(segmentation) if logic.GetSegmentStatus(s) == logic.Completed]


def _check_not_completed(segmentation: slicer.vtkMRMLSegmentationNode) -> None:
    """Refuse to overwrite finished (hand-corrected) segments; say how to keep them or release them."""
    done = completed_segments(segmentation)
    if done:
        raise ValueError(
            f"The output segmentation {_node_label(segmentation)} has segments marked Completed ({', '.join(done)}): "
            "re-running would replace that finished work. Choose 'Create new segmentation' as the output, or set "
            "their status back to In progress in the Segment Editor to allow replacing them."
        )


def check_options(batch_size: int, degradation_override: str | None, mirror: bool) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(mirror, bool):
        raise ValueError(f"mirror must be True or False, got {mirror!r}.")
    if degradation_override is not None:
        from .config import DEGRADATIONS

        if degradation_override not in DEGRADATIONS:
            raise ValueError(
                f"Unknown degradation {degradation_override!r}; "
                f"choose one of {list(DEGRADATIONS)}, or None to detect it."
            )


def model_tasks(weights: str | Path | None) -> dict[str, str]:
    """Task id -> readable label of a weights file (None: the shipped model), from its checked JSON: the
    network is not loaded. Raises `weights.WeightsError` (a ValueError) for a missing, corrupt or edited model."""
    from .weights import DEFAULT_WEIGHTS, read_model_info

    return read_model_info(weights or DEFAULT_WEIGHTS)[1].task_labels()


def check_task(task: str, offered: Callable[[], Mapping[str, str]]) -> None:
    """Refuse a task the model does not offer, naming the ones it does; `offered` is asked only for a named task,
    so "auto" never reads the model."""
    if not isinstance(task, str):
        raise ValueError(f"task must be a task name or {AUTO!r}, got {task!r}.")  # noqa: TRY004 (options raise ValueError)
    if task == AUTO:
        return
    choices = list(offered())
    if task not in choices:
        valid = f"{AUTO!r} or one of {', '.join(choices)}" if choices else f"{AUTO!r} only"
        raise ValueError(f"Unknown segmentation task {task!r}; this model's tasks are {valid}.")
