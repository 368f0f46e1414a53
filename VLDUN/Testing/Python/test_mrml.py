"""Node <-> array conversion with exact geometry, and segment terminology, against real MRML (slicer-core)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import slicer

from VLDUNLib import mrml, terminology
from VLDUNLib.mrml import SegmentSpec

CORONAL = np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
"""I -> R, J -> S, K -> A: slices written along A (a coronal acquisition)."""


def ramp(shape: tuple[int, int, int]) -> np.ndarray:
    """Distinct values everywhere, so any transposition or flip shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def blobs(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels 1 and 3 as boxes, label 2 absent."""
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 5:15, 6:20] = 1
    labels[2:5, 18:26, 4:12] = 3
    return labels


def specs(labels: tuple[int, ...] = (1, 2, 3)) -> list[SegmentSpec]:
    keys = ["ACDC/RV", "ACDC/MYO", "ACDC/LV"]
    return [SegmentSpec(v, *terminology.segment_style(keys[v - 1], v)) for v in labels]


def segments_of(node: Any) -> list[tuple[str, tuple[float, ...], str, int]]:
    segmentation = node.GetSegmentation()
    return [
        (s.GetName(), tuple(s.GetColor()), s.GetTerminology(), s.GetLabelValue())
        for s in (segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments()))
    ]


def exported_labels(scene: Any, segmentation: Any) -> tuple[np.ndarray, mrml.Geometry]:
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    return slicer.util.arrayFromVolume(labelmap).copy(), mrml.volume_geometry(labelmap)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_round_trip_is_an_exact_view(axis: int) -> None:
    volume = ramp((3, 4, 5))
    slices = mrml.volume_to_slices(volume, axis)
    assert slices.shape[0] == volume.shape[axis]
    assert np.shares_memory(slices, volume)
    np.testing.assert_array_equal(slices[1], np.take(volume, 1, axis=axis))
    back = mrml.slices_to_volume(slices, axis)
    assert back.shape == volume.shape and np.shares_memory(back, volume)
    np.testing.assert_array_equal(back, volume)


def test_slices_refuse_bad_axis() -> None:
    with pytest.raises(ValueError, match="axis"):
        mrml.volume_to_slices(ramp((3, 4, 5)), 3)


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [((1.0, 1.0, 5.0), 0), ((1.0, 5.0, 1.0), 1), ((5.0, 1.0, 1.0), 2), ((0.7, 0.7, 0.9), 0)],
)
def test_slice_axis_is_the_thick_axis(add_volume: Any, oblique: np.ndarray, spacing: tuple, expected: int) -> None:
    node = add_volume(ramp((6, 20, 24)), spacing=spacing, directions=oblique)
    assert mrml.slice_axis(node) == expected


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 1.15), (1.1, 1.0, 1.0)])
def test_slice_axis_of_near_isotropic_volume_is_the_most_superior_axis(add_volume: Any, spacing: tuple) -> None:
    """Spacing within the 1.2 ratio does not count as thick slices: the axial plane wins (J points S here)."""
    node = add_volume(ramp((6, 20, 24)), spacing=spacing, directions=CORONAL)
    assert mrml.slice_axis(node) == 1


def test_slice_axis_of_single_slice_is_that_slice(add_volume: Any) -> None:
    node = add_volume(ramp((20, 1, 24)), spacing=(1.0, 1.0, 9.0))
    assert mrml.slice_axis(node) == 1


def test_write_scalar_volume_keeps_exact_geometry(scene: Any, add_volume: Any, oblique: np.ndarray) -> None:
    reference = add_volume(ramp((6, 20, 24)), spacing=(0.8, 0.9, 5.0), origin=(-12.5, 33.25, 7.0), directions=oblique)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    reference.SetAndObserveTransformNodeID(transform.GetID())
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    values = ramp((6, 20, 24))[:, ::-1] * 0.5
    mrml.write_scalar_volume(output, values, reference)
    assert mrml.volume_geometry(output) == mrml.volume_geometry(reference)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output), values)
    assert output.GetTransformNodeID() == transform.GetID()
    assert output.GetDisplayNode() is not None


def test_write_scalar_volume_refuses_wrong_shape(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 20, 24)))
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(ValueError, match="shape"):
        mrml.write_scalar_volume(output, ramp((6, 24, 20)), reference)
    assert output.GetImageData() is None


def test_segmentation_exports_back_to_the_labels(scene: Any, add_volume: Any, oblique: np.ndarray) -> None:
    reference = add_volume(ramp((6, 30, 28)), spacing=(0.8, 0.8, 4.0), origin=(5.0, -7.0, 2.0), directions=oblique)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = blobs((6, 30, 28))
    mrml.write_segmentation(segmentation, labels, reference, specs())

    assert segments_of(segmentation) == [(s.name, s.color, s.terminology, s.label) for s in specs()]
    exported, geometry = exported_labels(scene, segmentation)
    np.testing.assert_array_equal(exported, labels)
    assert geometry == mrml.volume_geometry(reference)


def test_segmentation_is_complete_for_slicer(scene: Any, add_volume: Any) -> None:
    """Source labelmap, reference geometry from the input, surfaces for 3-D, a display node."""
    reference = add_volume(ramp((6, 30, 28)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.write_segmentation(segmentation, blobs((6, 30, 28)), reference, specs())

    content = segmentation.GetSegmentation()
    assert content.GetSourceRepresentationName() == mrml.BINARY_LABELMAP
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReferenceID(role) == reference.GetID()
    points = [content.GetNthSegment(i).GetRepresentation(mrml.CLOSED_SURFACE).GetNumberOfPoints() for i in range(3)]
    assert points[0] > 0 and points[1] == 0 and points[2] > 0
    assert segmentation.GetDisplayNode() is not None


def test_rewriting_replaces_all_segments(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.write_segmentation(segmentation, blobs((6, 30, 28)), reference, specs())
    only_first = np.where(blobs((6, 30, 28)) == 1, 1, 0).astype(np.uint8)
    mrml.write_segmentation(segmentation, only_first, reference, specs((1,)))

    assert [s[0] for s in segments_of(segmentation)] == [specs()[0].name]
    np.testing.assert_array_equal(exported_labels(scene, segmentation)[0], only_first)


def test_segmentation_refuses_labels_without_segment(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match=r"\[3\]"):
        mrml.write_segmentation(segmentation, blobs((6, 30, 28)), reference, specs((1, 2)))
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_files_round_trip(scene: Any, add_volume: Any, oblique: np.ndarray, tmp_path: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)), spacing=(0.8, 0.9, 4.0), origin=(5.0, -7.0, 2.0), directions=oblique)
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.write_scalar_volume(restored, ramp((6, 30, 28)) / 7, reference)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.write_segmentation(segmentation, blobs((6, 30, 28)), reference, specs())

    volume_file, segmentation_file = str(tmp_path / "restored.nrrd"), str(tmp_path / "labels.seg.nrrd")
    for node, storage, path in (
        (restored, slicer.vtkMRMLVolumeArchetypeStorageNode(), volume_file),
        (segmentation, slicer.vtkMRMLSegmentationStorageNode(), segmentation_file),
    ):
        storage.SetFileName(path)
        assert storage.WriteData(node)

    reloaded = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(volume_file)
    assert storage.ReadData(reloaded)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(reloaded), ramp((6, 30, 28)) / 7)
    expected, actual = mrml.volume_geometry(reference), mrml.volume_geometry(reloaded)
    assert actual.dims == expected.dims
    np.testing.assert_allclose(
        [actual.origin, actual.spacing, *actual.directions],
        [expected.origin, expected.spacing, *expected.directions],
        atol=1e-9,
    )

    segmentation_reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(segmentation_file)
    assert storage.ReadData(segmentation_reloaded)
    segmentation_reloaded.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    names_terms = [(name, term) for name, _, term, _ in segments_of(segmentation_reloaded)]
    assert names_terms == [(s.name, s.terminology) for s in specs()]
    colors = [color for _, color, _, _ in segments_of(segmentation_reloaded)]
    np.testing.assert_allclose(colors, [s.color for s in specs()], atol=1e-6)
    np.testing.assert_array_equal(exported_labels(scene, segmentation_reloaded)[0], blobs((6, 30, 28)))


def test_failed_write_restores_both_outputs(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)))
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.write_scalar_volume(restored, ramp((6, 30, 28)), reference)
    mrml.write_segmentation(segmentation, blobs((6, 30, 28)), reference, specs())
    before = segments_of(segmentation)

    moved = add_volume(ramp((4, 20, 22)), spacing=(2.0, 2.0, 2.0), origin=(9.0, 9.0, 9.0), name="other")
    with pytest.raises(RuntimeError, match="disk full"), mrml.outputs_restored_on_failure(restored, segmentation):
        mrml.write_scalar_volume(restored, ramp((4, 20, 22)) * 0, moved)
        segmentation.GetSegmentation().RemoveAllSegments()
        raise RuntimeError("disk full")

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(restored), ramp((6, 30, 28)))
    assert mrml.volume_geometry(restored) == mrml.volume_geometry(reference)
    assert segments_of(segmentation) == before
    np.testing.assert_array_equal(exported_labels(scene, segmentation)[0], blobs((6, 30, 28)))


def test_terminology_entries_parse_as_slicer_entries() -> None:
    """Slicer's own parser reads every entry back to the same codes, and re-serialises it unchanged."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for key, term in terminology.CLASS_TERMINOLOGY.items():
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(term.entry, entry), key
        assert logic.SerializeTerminologyEntry(entry) == term.entry
        assert entry.GetTerminologyContextName() == terminology.CONTEXT_NAME
        assert entry.GetCategoryObject().GetCodeValue() == term.category.value
        assert (entry.GetTypeObject().GetCodingSchemeDesignator(), entry.GetTypeObject().GetCodeValue()) == (
            term.type.scheme,
            term.type.value,
        )
        assert (entry.GetRegionObject().GetCodeValue() or "") == (term.region.value if term.region else "")
        assert entry.GetRegionContextName() == terminology.ANATOMIC_CONTEXT_NAME


def test_shipped_terminology_file_is_the_table_and_loads_in_slicer() -> None:
    assert json.loads(terminology.TERMINOLOGY_FILE.read_text()) == terminology.terminology_context()
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(terminology.TERMINOLOGY_FILE)) == terminology.CONTEXT_NAME
    for key, term in terminology.CLASS_TERMINOLOGY.items():
        found = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(terminology.CONTEXT_NAME, term.name, found), key
        assert found.GetTypeObject().GetCodeValue() == term.type.value
        assert tuple(found.GetTypeObject().GetRecommendedDisplayRGBValue()) == term.rgb


def test_terminology_covers_every_class_with_distinct_colours() -> None:
    table = terminology.CLASS_TERMINOLOGY
    assert len({term.rgb for term in table.values()}) == len(table)
    assert len({(term.type, term.region) for term in table.values()}) == len(table)
    assert terminology.display_name("ACDC/LV") == "left ventricle cavity"
    assert terminology.segment_style("FLARE22/Liver", 1) == terminology.segment_style("AbdomenCT/liver", 5)


def test_unknown_classes_get_default_terminology_and_distinct_colours() -> None:
    styles = [terminology.segment_style("Other/left_lung", i) for i in range(1, 9)]
    assert {name for name, _, _ in styles} == {"left lung"}
    assert {entry for _, _, entry in styles} == {terminology.DEFAULT_ENTRY} == {slicer.vtkSegment().GetTerminology()}
    colors = np.array([color for _, color, _ in styles])
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert distances[~np.eye(len(colors), dtype=bool)].min() > 0.1


def test_vtk_errors_are_caught(vtk_errors: list[str]) -> None:
    """The fixture behind `scene` must see VTK errors, or the other tests could pass over silent failures."""
    slicer.vtkSegmentation().AddSegment(None)
    assert any("Invalid segment" in message for message in vtk_errors)
    vtk_errors.clear()


def test_display_range_is_the_percentile_window_of_the_finite_values() -> None:
    values = np.random.default_rng(0).normal(100.0, 20.0, (40, 64, 64)).astype(np.float32)
    values[0, 0, :5] = np.nan
    low, high = mrml.display_range(values)
    expected = np.percentile(values[np.isfinite(values)], [0.1, 99.9])
    assert abs(low - expected[0]) < 3 and abs(high - expected[1]) < 3
    assert mrml.display_range(np.full((2, 4, 4), 7.0)) == (7.0, 8.0)
    assert mrml.display_range(np.full((2, 4, 4), np.nan)) == (0.0, 1.0)


def test_a_staged_window_is_shown_without_the_automatic_one(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)))
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.commit_scalar_volume(restored, mrml.volume_image(ramp((6, 30, 28)), reference), reference, (10.0, 110.0))
    display = restored.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((100.0, 60.0))


def test_a_failed_write_restores_the_window_too(scene: Any, add_volume: Any) -> None:
    reference = add_volume(ramp((6, 30, 28)))
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.write_scalar_volume(restored, ramp((6, 30, 28)), reference)
    display = restored.GetDisplayNode()
    before = (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel())
    with pytest.raises(RuntimeError), mrml.outputs_restored_on_failure(restored, segmentation):
        mrml.commit_scalar_volume(restored, mrml.volume_image(ramp((6, 30, 28)), reference), reference, (0.0, 1.0))
        raise RuntimeError("disk full")
    assert (display.GetAutoWindowLevel(), display.GetWindow(), display.GetLevel()) == pytest.approx(before)


def test_every_class_of_the_recipe_datasets_has_its_terminology() -> None:
    """The recipe trains on the five developer datasets; each class is named and coded, none by the fallback."""
    classes = ["ACDC/RV", "ACDC/MYO", "ACDC/LV", "BraTS2015/necrosis", "BraTS2015/edema", "BraTS2015/non_enhancing",
               "BraTS2015/enhancing", "COVID19CT/infection", "AbdomenCT/liver", "AbdomenCT/spleen", "AbdomenCT/kidney",
               "BraTS2018/whole_tumor"]
    assert all(terminology.segment_style(key, 0)[2] != terminology.DEFAULT_ENTRY for key in classes)
    assert terminology.display_name("BraTS2018/whole_tumor") == "tumour, sub-region not distinguished"
