"""Restore and segment a scalar volume node with VL-DUN, writing a restored volume and a segmentation.

The same code runs inside the 3D Slicer application and in plain Python with `slicer-core`: it never
imports Qt and never uses `slicer.app` or `slicer.mrmlScene`; the scene is the input node's own.
It imports without torch, so the module can offer to install `missing_dependencies()` first;
`DEGRADATION_CHOICES` loads torch on first use.

The model runs in a worker process (`job.VLDUNJob`: start, poll, cancel), so Slicer's GUI stays
responsive; `VLDUNLogic.process` is the same job run to the end for scripts. Order of work: check
everything (`validate_input`, the outputs, the options), predict, then write. Nothing in the scene
changes before the prediction has finished, so a cancel or a failed prediction leaves the scene exactly
as it was; if writing fails, both outputs get their previous content back. The input node is only read.
An output segmentation holding segments VL-DUN did not make (`foreign_segments`) is refused unless
`replace_segments=True`; segments marked Completed are never replaced.

`task` picks the classes to segment: one of `VLDUNLogic.tasks()` (read from the model's JSON, without loading
the network), or "auto" for the detected modality's task. In "auto" a scan the model flags as unknown gets
its restored volume and no segmentation: the output segmentation is left as it was, and the returned
detection's `segmentation_note` (the job's `status.note`, for a panel) says why. A task the model lacks is
refused before the worker starts, with the valid ones named.

Headless use, Slicer application without a window
(`Slicer --no-main-window --python-script run_vldun.py scan.nrrd out/scan`)::

    import sys
    import slicer
    from VLDUNLib.logic import VLDUNLogic

    scan = slicer.util.loadVolume(sys.argv[1])
    restored = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    detection = VLDUNLogic().process(scan, restored, segmentation, device="auto", task="auto")
    print(detection.modality, detection.degradation, detection.segment_names, detection.segmentation_note)
    slicer.util.saveNode(restored, sys.argv[2] + "_restored.nrrd")
    slicer.util.saveNode(segmentation, sys.argv[2] + ".seg.nrrd")
    slicer.util.exit(0)

Plain Python (`pip install slicer-core`, or PythonSlicer) has no `slicer.mrmlScene`: make a
`slicer.vtkMRMLScene()`, add nodes with `scene.AddNewNodeByClass`, read and write files with
`vtkMRMLVolumeArchetypeStorageNode` / `vtkMRMLSegmentationStorageNode` (`ReadData`, `WriteData`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import slicer
import slicer.util

from .checks import (  # noqa: F401 (validate_input, foreign_segments and MIN_IN_PLANE are part of the logic's API)
    MIN_IN_PLANE,
    Predictor,
    check_options,
    completed_segments,
    foreign_segments,
    model_tasks,
    validate_input,
    validate_outputs,
)
from .tasks import AUTO

if TYPE_CHECKING:
    from .job import VLDUNJob
    from .results import Detection

REQUIREMENTS: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "open_clip": "open_clip_torch",
    "safetensors": "safetensors",
}
"""Importable module -> pip requirement, for what inference needs beyond Slicer's own Python."""

ProgressCallback = Callable[[int, int, float], None]
"""progress(slices_done, slices_total, seconds_left)."""


def __getattr__(name: str) -> Any:
    """Re-exports loaded on first use (PEP 562), so this module imports without torch and without a cycle."""
    if name in ("Cancelled", "Detection"):
        from . import results

        return getattr(results, name)
    if name == "DEGRADATION_CHOICES":
        from .degradations import DEGRADATIONS

        return list(DEGRADATIONS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def missing_dependencies() -> list[str]:
    """pip requirements to install before `process` can run (empty when everything is there)."""
    return [requirement for module, requirement in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def available_devices() -> list[str]:
    """Choices for `process(device=...)`: "auto" first, the accelerators this machine has, "cpu" last."""
    devices = ["auto"]
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
        if torch.backends.mps.is_available():
            devices.append("mps")
    return [*devices, "cpu"]


class VLDUNLogic:
    """Runs a VL-DUN model on volume nodes, in a worker process (or, for tests and scripts, a given predictor)."""

    def __init__(self, weights: str | Path | None = None, predictor: Predictor | None = None) -> None:
        """`weights`: a .safetensors file (None: the shipped model); `predictor` replaces the model and runs in a
        thread of this process instead of the worker (tests, scripts with their own model)."""
        self.weights = weights
        self.predictor = predictor

    def tasks(self) -> dict[str, str]:
        """Task id -> readable label, the choices for `task` besides "auto" (e.g. a selector's items), in the
        model's order. Read from the weights' JSON, so the network is not loaded; raises ValueError for a
        missing, corrupt or edited model."""
        return self.predictor.tasks() if self.predictor is not None else model_tasks(self.weights)

    def job(
        self,
        inputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputSegmentation: slicer.vtkMRMLSegmentationNode,
        device: str = "auto",
        progress: ProgressCallback | None = None,
        degradation_override: str | None = None,
        batch_size: int = 8,
        mirror: bool = False,
        replace_segments: bool = False,
        task: str = AUTO,
    ) -> VLDUNJob:
        """A run not yet started: call its `start()`, then `poll()` (e.g. from a QTimer) until it returns True.
        `start()` refuses a `task` the model lacks before the worker starts."""
        from .job import InThread, JobOptions, VLDUNJob

        options = JobOptions(
            weights=None if self.weights is None else str(self.weights),
            device=device,
            degradation_override=degradation_override,
            batch_size=batch_size,
            mirror=mirror,
            replace_segments=replace_segments,
            task=task,
        )
        compute = InThread(self.predictor, options) if self.predictor is not None else None
        return VLDUNJob(inputVolume, outputVolume, outputSegmentation, options, compute, progress)

    def process(
        self,
        inputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputSegmentation: slicer.vtkMRMLSegmentationNode,
        device: str = "auto",
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        degradation_override: str | None = None,
        batch_size: int = 8,
        mirror: bool = False,
        replace_segments: bool = False,
        task: str = AUTO,
    ) -> Detection:
        """Restore `inputVolume` into `outputVolume` and segment it into `outputSegmentation`; returns when done.

        Slices are cut along the acquisition axis (`mrml.slice_axis`); the outputs get the input's
        exact geometry and parent transform. Raises ValueError for unusable input (nothing changed),
        `Cancelled` when `should_cancel()` returned True (nothing changed) and `job.WorkerFailed` when the
        model's process failed (nothing changed). Returns what the prior detected (modality, degradation,
        classes). `mirror` averages the segmentation over each slice and its 3 mirror images: 4x the
        segmentation pass, a little better on large organs, worse on small lesions (MODEL_CARD.md).
        `task`: see the module docstring; with no segmentation written, `Detection.segmentation_note` says why.
        """
        from .job import run

        job = self.job(inputVolume, outputVolume, outputSegmentation, device, progress, degradation_override,
                       batch_size, mirror, replace_segments, task=task)
        return run(job, should_cancel)
