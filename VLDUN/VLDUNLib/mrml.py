"""MRML nodes <-> numpy arrays, keeping the voxel geometry exact.

Works in the 3D Slicer application and in plain Python with the `slicer-core` package: nothing here
uses Qt, `slicer.app` or `slicer.mrmlScene`; the scene is always the nodes' own.

Array convention: `slicer.util.arrayFromVolume` gives (K, J, I), so numpy axis `a` is IJK axis `2 - a`.
The network sees a stack of 2-D slices (S, H, W) cut along the acquisition axis (`slice_axis`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import get_vtk_array_type, vtk_to_numpy

from .geometry import slices_to_volume, through_plane_axis, volume_to_slices  # noqa: F401 (re-exported for callers)

"""A spacing this much larger than both others marks the thick-slice (acquisition) axis."""

MODEL_TAG = "VLDUN.Source"
MODEL_TAG_VALUE = "VL-DUN"
"""Segment tag marking a segment VL-DUN made, saved with the segmentation: any other segment is someone's work."""

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a volume lie in patient (RAS) space."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    """Along I, J, K."""
    directions: tuple[tuple[float, float, float], ...]
    """3x3 IJK->RAS direction matrix, row-major: column c is the RAS direction of IJK axis c."""
    dims: tuple[int, int, int]
    """Voxels along I, J, K; (0, 0, 0) for a node without image data."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment to create: which label value it covers and how it is shown and coded."""

    label: int
    name: str
    color: tuple[float, float, float]
    terminology: str
    """Slicer terminology entry string (see `terminology.py`)."""


def volume_geometry(node: slicer.vtkMRMLVolumeNode) -> Geometry:
    """Origin, spacing, directions and dimensions of a volume node."""
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    image = node.GetImageData()
    dims = tuple(image.GetDimensions()) if image else (0, 0, 0)
    return Geometry(
        tuple(node.GetOrigin()),
        tuple(node.GetSpacing()),
        tuple(tuple(float(v) for v in row) for row in directions),
        dims,
    )


def apply_geometry(node: slicer.vtkMRMLVolumeNode, geometry: Geometry) -> None:
    """Give `node` exactly this origin, spacing and directions (the dimensions belong to its image)."""
    node.SetIJKToRASDirections([list(row) for row in geometry.directions])
    node.SetSpacing(*geometry.spacing)
    node.SetOrigin(*geometry.origin)


def slice_axis(node: slicer.vtkMRMLVolumeNode) -> int:
    """The numpy axis of `arrayFromVolume(node)` along which the volume was acquired (see `through_plane_axis`)."""
    geometry = volume_geometry(node)
    return through_plane_axis(geometry.dims[::-1], geometry.spacing[::-1], np.asarray(geometry.directions)[:, ::-1])


def _check_shape(array: np.ndarray, reference: slicer.vtkMRMLVolumeNode, what: str) -> None:
    expected = volume_geometry(reference).dims[::-1]
    if array.shape != expected:
        raise ValueError(
            f"The {what} array has shape {array.shape} but the reference volume "
            f"'{reference.GetName()}' has {expected} (K, J, I); pass an array of the reference's shape."
        )


def _image_from_array(array: np.ndarray, image: vtk.vtkImageData) -> vtk.vtkImageData:
    """Fill a new image with `array` in one copy (any memory layout, e.g. a transposed view)."""
    image.SetDimensions(array.shape[::-1])
    image.AllocateScalars(get_vtk_array_type(array.dtype), 1)
    vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array.shape)[...] = array
    return image


def _follow_reference(node: slicer.vtkMRMLNode, reference: slicer.vtkMRMLVolumeNode) -> None:
    """Same parent transform as the reference, so outputs overlay it even when it is transformed."""
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())


def volume_image(array: np.ndarray, reference: slicer.vtkMRMLVolumeNode) -> vtk.vtkImageData:
    """`array` (K, J, I) as a new image for a volume on `reference`'s grid, made before any node is touched."""
    _check_shape(array, reference, "volume")
    return _image_from_array(array, vtk.vtkImageData())


def display_range(array: np.ndarray, samples: int = 1 << 16) -> tuple[float, float]:
    """The 0.1-99.9 percentile range of `array`'s finite values, from an even subsample of about `samples` voxels.

    It is the window Slicer's automatic window/level picks; computed while staging, it spares the commit the
    display node's histogram of every voxel (60-80 ms for 100 x 256 x 256, in one GUI-thread step).
    """
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // samples)]
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, [0.1, 99.9]))
    return low, high if high > low else low + 1.0


def commit_scalar_volume(
    node: slicer.vtkMRMLScalarVolumeNode,
    image: vtk.vtkImageData,
    reference: slicer.vtkMRMLVolumeNode,
    window: tuple[float, float] | None = None,
) -> None:
    """Give `node` the image from `volume_image` and exactly `reference`'s geometry; with `window` (from
    `display_range`), show it with that fixed window instead of the display's automatic one.

    The image is a new object, so the previous one stays valid for `outputs_restored_on_failure`.
    """
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    if window is not None:
        display = node.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*window)
    node.SetAndObserveImageData(image)
    apply_geometry(node, volume_geometry(reference))
    _follow_reference(node, reference)


def write_scalar_volume(
    node: slicer.vtkMRMLScalarVolumeNode, array: np.ndarray, reference: slicer.vtkMRMLVolumeNode
) -> None:
    """Replace `node`'s voxels with `array` (K, J, I) and give it exactly `reference`'s geometry."""
    commit_scalar_volume(node, volume_image(array, reference), reference)


def ensure_closed_surface_rule() -> None:
    """Register labelmap<->surface conversion where no Segmentations module did (plain-Python slicer-core).

    In the Slicer application the module registers them at startup, so this does nothing there.
    A segmentation copies the registered rules when it is created.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    pairs = {(r.GetSourceRepresentationName(), r.GetTargetRepresentationName()) for r in factory.GetConverterRules()}
    if (BINARY_LABELMAP, CLOSED_SURFACE) not in pairs:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    if (CLOSED_SURFACE, BINARY_LABELMAP) not in pairs:
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _check_labels(labels: np.ndarray, segments: Sequence[SegmentSpec]) -> None:
    """Every label value must have a segment, or voxels would silently vanish from the segmentation."""
    if labels.dtype != np.uint8:
        raise ValueError(
            f"Labels must be uint8 (0 background, 1..255 classes), got {labels.dtype}; "
            "cast them with labels.astype(np.uint8)."
        )
    declared = [spec.label for spec in segments]
    if len(set(declared)) != len(declared) or not all(1 <= v <= 255 for v in declared):
        raise ValueError(f"Segment label values must be distinct and in 1..255, got {declared}.")
    undeclared = np.ones(256, bool)
    undeclared[[0, *declared]] = False
    if undeclared[labels].any():  # a table lookup: a count of all values took 160 ms for 155 x 240 x 240
        missing = sorted(set(np.unique(labels).tolist()) - {0, *declared})
        raise ValueError(
            f"Label values {missing} occur in the labels but no segment was given for them; "
            "add a SegmentSpec per value."
        )


def _labelmap_image(labels: np.ndarray, reference: slicer.vtkMRMLVolumeNode) -> slicer.vtkOrientedImageData:
    """The labels as one oriented image on the reference's voxel grid."""
    image = _image_from_array(labels, slicer.vtkOrientedImageData())
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(ijk_to_ras)
    image.SetImageToWorldMatrix(ijk_to_ras)
    return image


def _segment(spec: SegmentSpec, labelmap: slicer.vtkOrientedImageData) -> slicer.vtkSegment:
    segment = slicer.vtkSegment()
    segment.SetName(spec.name)
    segment.SetColor(*spec.color)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), spec.terminology)
    segment.SetTag(MODEL_TAG, MODEL_TAG_VALUE)
    segment.AddRepresentation(BINARY_LABELMAP, labelmap)
    segment.SetLabelValue(spec.label)
    return segment


def build_segmentation(
    labels: np.ndarray,
    reference: slicer.vtkMRMLVolumeNode,
    segments: Sequence[SegmentSpec],
    surfaces: bool = True,
) -> slicer.vtkSegmentation:
    """A complete segmentation, outside any scene: one segment per spec, in the given order.

    All segments share one labelmap (each covers its label value), as Slicer's own labelmap import
    does; a class absent from `labels` still gets its (empty) segment so it can be painted by hand.
    The closed surfaces are made too (unless `surfaces` is False: `add_surfaces` later), so the 3-D view
    shows the result at once.
    """
    _check_shape(labels, reference, "label")
    _check_labels(labels, segments)
    ensure_closed_surface_rule()
    labelmap = _labelmap_image(labels, reference)
    segmentation = slicer.vtkSegmentation()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    segmentation.SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(labelmap),
    )
    for spec in segments:
        segmentation.AddSegment(_segment(spec, labelmap))
    if surfaces:
        add_surfaces(segmentation)
    return segmentation


def add_surfaces(segmentation: slicer.vtkSegmentation) -> None:
    """The closed surfaces the 3-D view shows; the slowest step of writing a segmentation."""
    segmentation.CreateRepresentation(CLOSED_SURFACE)


def commit_segmentation(
    node: slicer.vtkMRMLSegmentationNode, staged: slicer.vtkSegmentation, reference: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """Replace all segments of `node` by those of `staged` (from `build_segmentation`), on `reference`'s geometry.

    `staged` becomes the node's segmentation object: a pointer swap, where copying into the old object took
    about 90 ms for 100 x 256 x 256 voxels (removing its segments), in one GUI-thread step.
    """
    modifying = node.StartModify()
    _follow_reference(node, reference)
    node.SetAndObserveSegmentation(staged)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.EndModify(modifying)


def write_segmentation(
    node: slicer.vtkMRMLSegmentationNode,
    labels: np.ndarray,
    reference: slicer.vtkMRMLScalarVolumeNode,
    segments: Sequence[SegmentSpec],
) -> None:
    """Replace all segments of `node` by those of `labels` (K, J, I), on `reference`'s geometry.

    The segmentation is built completely before `node` is touched; re-running replaces, never adds.
    """
    commit_segmentation(node, build_segmentation(labels, reference, segments), reference)


@contextmanager
def outputs_restored_on_failure(
    volume: slicer.vtkMRMLScalarVolumeNode, segmentation: slicer.vtkMRMLSegmentationNode
) -> Iterator[None]:
    """Both outputs are written, or both get their previous content back and the error propagates."""
    image, geometry, volume_transform = volume.GetImageData(), volume_geometry(volume), volume.GetTransformNodeID()
    display = volume.GetDisplayNode()
    shown = (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel()) if display else None
    segments = slicer.vtkSegmentation()
    segments.DeepCopy(segmentation.GetSegmentation())
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    reference_id, segmentation_transform = segmentation.GetNodeReferenceID(role), segmentation.GetTransformNodeID()
    try:
        yield
    except BaseException:
        volume.SetAndObserveImageData(image)
        apply_geometry(volume, geometry)
        volume.SetAndObserveTransformNodeID(volume_transform)
        if display is not None:
            display.SetWindowLevel(shown[1], shown[2])
            display.SetAutoWindowLevel(shown[0])
        segmentation.SetAndObserveTransformNodeID(segmentation_transform)
        segmentation.GetSegmentation().DeepCopy(segments)
        segmentation.SetNodeReferenceID(role, reference_id)
        raise
