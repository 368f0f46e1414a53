"""Regenerate the extension's figures from a real run: `python docs/figures/make_figures.py [DATA_ROOT]`.

A cardiac cine MRI volume of the ACDC developer set (nnU-Net layout under DATA_ROOT, default
/work/shared/data) is degraded with the project's own Rician noise, loaded into an MRML scene
(slicer-core), restored and segmented by `VLDUNLogic.process` with the shipped weights (in its
worker process, on the CPU), and the nodes the logic made are rendered offscreen with VTK:

- slices_with_segmentation.png: three slices, each as degraded input | restored | restored with the segments;
- segments_3d.png: the segments' closed surfaces.

These are VTK renders of the logic's MRML nodes, not screenshots of the Slicer window.
Needs slicer-core, torch, SimpleITK; no display (VTK falls back to EGL or OSMesa).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
import torch
import vtk
from vtk.util.numpy_support import numpy_to_vtk

from VLDUNLib import mrml
from VLDUNLib.degradations import rician_noise
from VLDUNLib.logic import VLDUNLogic

HERE = Path(__file__).resolve().parent
CASE = "Dataset001_ACDC/imagesTr/patient001_frame01_0000.nii.gz"
NOISE_SIGMA = 0.08
"""Rician noise level on the [0, 1] intensities of the ACDC copy."""
SPACING = (1.5, 1.5, 8.0)
"""Typical ACDC voxel size in mm: the developer copy stores 1, 1, 1 (spacing unknown)."""
PANEL = 170


def degraded_case(data_root: Path) -> np.ndarray:
    """(K, J, I) volume of the case with Rician noise, seeded so the figures are reproducible."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(data_root / CASE), sitk.sitkFloat32))
    x = torch.from_numpy(volume)[:, None]
    noisy = rician_noise(x, NOISE_SIGMA, generator=torch.Generator().manual_seed(0)).image[:, 0].numpy()
    return noisy.astype(np.float32)


def run_logic(volume: np.ndarray) -> tuple:
    """The scene after VLDUNLogic.process: input, restored volume and segmentation nodes, and the detection."""
    mrml.ensure_closed_surface_rule()  # what Slicer's Segmentations module does at startup
    scene = slicer.vtkMRMLScene()
    source = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ACDC patient001 ED, Rician noise")
    slicer.util.updateVolumeFromArray(source, volume)
    source.SetSpacing(*SPACING)
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    detection = VLDUNLogic().process(source, restored, segmentation, device="cpu")
    return scene, source, restored, segmentation, detection


def exported_labels(scene: slicer.vtkMRMLScene, segmentation: slicer.vtkMRMLSegmentationNode) -> np.ndarray:
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    return slicer.util.arrayFromVolume(labelmap).copy()


def segment_colors(segmentation: slicer.vtkMRMLSegmentationNode) -> list[tuple[str, tuple[float, float, float]]]:
    content = segmentation.GetSegmentation()
    return [(content.GetNthSegment(i).GetName(), tuple(content.GetNthSegment(i).GetColor()))
            for i in range(content.GetNumberOfSegments())]


def rgb_image(grey: np.ndarray, labels: np.ndarray | None, colors: list) -> vtk.vtkImageData:
    """A 2-D slice as an RGB image; labels blended in at 50 % with the segments' own colours."""
    low, high = np.percentile(grey, [1, 99.5])
    rgb = np.repeat(np.clip((grey - low) / (high - low), 0, 1)[..., None], 3, axis=-1)
    if labels is not None:
        for value, (_, color) in enumerate(colors, start=1):
            mask = labels == value
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.asarray(color)
    pixels = (rgb[::-1] * 255).astype(np.uint8)  # VTK's image rows run bottom-up
    image = vtk.vtkImageData()
    image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(pixels.reshape(-1, 3), deep=True))
    return image


def add_text(renderer: vtk.vtkRenderer, text: str, size: int = 13, position: tuple[int, int] = (6, 6)) -> None:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetTextProperty().SetFontSize(size)
    actor.GetTextProperty().SetColor(1, 1, 0.6)
    actor.SetPosition(*position)
    renderer.AddViewProp(actor)


def image_renderer(image: vtk.vtkImageData, viewport: tuple[float, ...], label: str) -> vtk.vtkRenderer:
    renderer = vtk.vtkRenderer()
    renderer.SetViewport(*viewport)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    renderer.AddActor(actor)
    renderer.ResetCamera()
    renderer.GetActiveCamera().Zoom(1.35)
    add_text(renderer, label)
    return renderer


def write_png(window: vtk.vtkRenderWindow, path: Path) -> None:
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def slices_figure(source, restored, labels: np.ndarray, colors: list, path: Path) -> None:
    degraded, clean = slicer.util.arrayFromVolume(source), slicer.util.arrayFromVolume(restored)
    counts = [(labels[k] > 0).sum() for k in range(len(labels))]
    order = np.argsort(counts)[::-1]
    picks = sorted(order[:3])
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(3 * PANEL, len(picks) * PANEL)
    columns = [("degraded input", degraded, False), ("restored", clean, False), ("restored + segments", clean, True)]
    for row, k in enumerate(picks):
        for column, (title, array, overlay) in enumerate(columns):
            viewport = (column / 3, 1 - (row + 1) / len(picks), (column + 1) / 3, 1 - row / len(picks))
            image = rgb_image(array[k], labels[k] if overlay else None, colors)
            window.AddRenderer(image_renderer(image, viewport, f"{title}, slice {k}"))
    write_png(window, path)


def surfaces_figure(segmentation, colors: list, detection, path: Path) -> None:
    segmentation.CreateClosedSurfaceRepresentation()
    content = segmentation.GetSegmentation()
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.1, 0.1, 0.15)
    for i in range(content.GetNumberOfSegments()):
        surface = vtk.vtkPolyData()
        segmentation.GetClosedSurfaceRepresentation(content.GetNthSegmentID(i), surface)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(surface)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*colors[i][1])
        actor.GetProperty().SetOpacity(0.55 if i == 1 else 1.0)
        renderer.AddActor(actor)
    renderer.ResetCamera()
    camera = renderer.GetActiveCamera()
    camera.Elevation(-35)
    camera.Azimuth(-70)
    camera.OrthogonalizeViewUp()
    renderer.ResetCamera()
    camera.Zoom(1.3)
    for line, (name, color) in enumerate(colors):
        add_text(renderer, name, 13, (6, 6 + 18 * line))
        renderer.GetViewProps().GetLastProp().GetTextProperty().SetColor(*color)
    add_text(renderer, f"detected {detection.modality}, {detection.degradation.replace('_', ' ')}", 13,
             (6, 6 + 18 * len(colors)))
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(480, 420)
    window.AddRenderer(renderer)
    write_png(window, path)


def main(argv: list[str]) -> None:
    data_root = Path(argv[0]) if argv else Path("/work/shared/data")
    scene, source, restored, segmentation, detection = run_logic(degraded_case(data_root))
    print(f"detected {detection.modality} ({detection.modality_probability:.0%}), "
          f"{detection.degradation} ({detection.degradation_probability:.0%}); segments {detection.segment_names}")
    labels, colors = exported_labels(scene, segmentation), segment_colors(segmentation)
    slices_figure(source, restored, labels, colors, HERE / "slices_with_segmentation.png")
    surfaces_figure(segmentation, colors, detection, HERE / "segments_3d.png")


if __name__ == "__main__":
    main(sys.argv[1:])
