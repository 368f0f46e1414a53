"""VLDUNLogic.process on real MRML nodes (slicer-core) with a fake predictor: what it writes, what it refuses,
and that it never changes the scene when it stops early."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import slicer

from VLDUNLib import logic, mrml, terminology
from VLDUNLib.logic import VLDUNLogic

SHAPE = (8, 40, 36)
"""(K, J, I) of the default test scan."""
OBLIQUE_SHAPE = (20, 40, 12)


def scan(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def digest(node: Any) -> str:
    return hashlib.sha256(slicer.util.arrayFromVolume(node).tobytes()).hexdigest()


def exported_labels(scene: Any, segmentation: Any) -> np.ndarray:
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    labels = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    return labels


def segment_summary(node: Any) -> list[tuple[str, str, tuple[float, ...], str]]:
    content = node.GetSegmentation()
    summary = []
    for i in range(content.GetNumberOfSegments()):
        segment = content.GetNthSegment(i)
        color = tuple(segment.GetColor())
        summary.append((content.GetNthSegmentID(i), segment.GetName(), color, segment.GetTerminology()))
    return summary


def scene_state(scene: Any) -> list[tuple[str, int]]:
    """Every node's ID and modification time: equal lists mean nothing was added, removed or touched."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetMTime()) for node in nodes]


@pytest.fixture
def outputs(scene: Any) -> tuple[Any, Any]:
    return (
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored"),
        scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation"),
    )


@pytest.fixture
def oblique_scan(add_volume: Any, oblique: np.ndarray) -> Any:
    """Oblique, 12 slices of 4 mm along I (not K), off-origin: every way geometry could be lost."""
    return add_volume(
        scan(OBLIQUE_SHAPE), spacing=(4.0, 0.9, 0.9), origin=(-20.5, 11.0, 3.25), directions=oblique, name="scan"
    )


def test_outputs_are_the_prediction_on_the_input_geometry(
    scene: Any, oblique_scan: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    restored, segmentation = outputs
    detection = VLDUNLogic(predictor=fake_predictor).process(oblique_scan, restored, segmentation)

    assert fake_predictor.seen.shape == (12, 20, 40)
    assert mrml.volume_geometry(restored) == mrml.volume_geometry(oblique_scan)
    prediction = fake_predictor.last
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(restored), mrml.slices_to_volume(prediction.restored, 2))
    np.testing.assert_array_equal(exported_labels(scene, segmentation), mrml.slices_to_volume(prediction.labels, 2))
    assert detection is prediction.detection
    expected = [(s.name, *terminology.segment_style(s.key, s.label)[1:]) for s in detection.segments]
    assert [summary[1:] for summary in segment_summary(segmentation)] == expected


def test_model_reads_the_input_in_place_and_cannot_write_it(
    add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    """No copy of the whole volume is made for the model, and the view it gets is read-only."""
    source = add_volume(scan(), spacing=(0.9, 0.9, 5.0))
    VLDUNLogic(predictor=fake_predictor).process(source, *outputs)
    assert np.shares_memory(fake_predictor.seen, slicer.util.arrayFromVolume(source))
    assert not fake_predictor.seen.flags.writeable


@pytest.mark.parametrize(("shape", "batch_size"), [((1, 40, 36), 8), ((8, 40, 36), 64), ((8, 40, 36), 1)])
def test_single_slices_and_any_batch_size_work(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any, shape: tuple, batch_size: int
) -> None:
    source = add_volume(scan(shape))
    VLDUNLogic(predictor=fake_predictor).process(source, *outputs, batch_size=batch_size)
    assert mrml.volume_geometry(outputs[0]) == mrml.volume_geometry(source)
    np.testing.assert_array_equal(exported_labels(scene, outputs[1]), fake_predictor.last.labels)


def test_progress_counts_slices_and_estimates_time_left(
    add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    calls: list[tuple[int, int, float]] = []
    runner = VLDUNLogic(predictor=fake_predictor)
    runner.process(add_volume(scan()), *outputs, batch_size=3, progress=lambda *args: calls.append(args))
    assert [(done, total) for done, total, _ in calls] == [(3, 8), (6, 8), (8, 8)]
    assert all(seconds >= 0 for _, _, seconds in calls) and calls[-1][2] == 0


def test_cancel_leaves_the_scene_unchanged(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    first, second = add_volume(scan()), add_volume(scan(seed=1), name="second")
    runner = VLDUNLogic(predictor=fake_predictor)
    runner.process(first, *outputs)
    restored, segmentation = outputs
    labels = exported_labels(scene, segmentation)
    before = (scene_state(scene), digest(restored), segment_summary(segmentation))
    fake_predictor.batches = 0

    with pytest.raises(logic.Cancelled):
        runner.process(second, *outputs, batch_size=2, should_cancel=lambda: fake_predictor.batches >= 1)

    assert fake_predictor.batches >= 1
    assert (scene_state(scene), digest(restored), segment_summary(segmentation)) == before
    np.testing.assert_array_equal(exported_labels(scene, segmentation), labels)


def test_rerun_replaces_outputs_and_never_touches_the_input(
    scene: Any, oblique_scan: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    def input_state() -> tuple[Any, ...]:
        image = oblique_scan.GetImageData()
        return digest(oblique_scan), oblique_scan.GetMTime(), image.GetMTime(), mrml.volume_geometry(oblique_scan)

    before = input_state()
    runner = VLDUNLogic(predictor=fake_predictor)
    runner.process(oblique_scan, *outputs)
    nodes = scene.GetNumberOfNodes()
    runner.process(oblique_scan, *outputs)

    assert outputs[1].GetSegmentation().GetNumberOfSegments() == len(fake_predictor.last.detection.segments)
    assert scene.GetNumberOfNodes() == nodes
    assert input_state() == before


def test_failed_write_restores_the_previous_outputs(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = add_volume(scan())
    runner = VLDUNLogic(predictor=fake_predictor)
    runner.process(first, *outputs)
    restored, segmentation = outputs
    before = (digest(restored), mrml.volume_geometry(restored), segment_summary(segmentation))

    def fail(*args: Any) -> None:
        raise MemoryError("out of memory while writing")

    monkeypatch.setattr(mrml, "commit_segmentation", fail)
    second = add_volume(scan((6, 30, 20), seed=2), spacing=(2.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0), name="second")
    with pytest.raises(MemoryError):
        runner.process(second, *outputs)
    assert (digest(restored), mrml.volume_geometry(restored), segment_summary(segmentation)) == before


def _labelmap(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(scan(), class_name="vtkMRMLLabelMapVolumeNode"), None, None


def _segmentation(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), None, None


def _vector(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(np.stack([scan()] * 3, axis=-1), class_name="vtkMRMLVectorVolumeNode"), None, None


def _non_finite(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    values = scan()
    values[0, 0, :3] = np.nan
    values[4, 5, :2] = [np.inf, -np.inf]
    return add(values), None, None


def _constant(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(np.full(SHAPE, 7, np.int16)), None, None


def _tiny(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(scan((20, 12, 40))), None, None


def _output_is_input(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    source = add(scan())
    return source, source, None


def _output_elsewhere(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(scan()), slicer.vtkMRMLScalarVolumeNode(), None


def _output_is_labelmap(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    return add(scan()), scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"), None


def _sequence_frame(scene: Any, add: Any) -> tuple[Any, Any, Any]:
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    frame = add(scan(), name="cine frame")
    browser.AddProxyNode(frame, sequence, False)
    return frame, None, None


REFUSALS: dict[str, tuple[Callable[[Any, Any], tuple[Any, Any, Any]], dict[str, Any], str]] = {
    "no input": (lambda scene, add: (None, None, None), {}, "No input volume"),
    "labelmap": (_labelmap, {}, "labelmap"),
    "segmentation": (_segmentation, {}, "is a segmentation"),
    "vector": (_vector, {}, "Vector to Scalar Volume"),
    "NaN and infinity": (_non_finite, {}, "5 NaN or infinite voxels"),
    "constant": (_constant, {}, "have the value 7"),
    "tiny": (_tiny, {}, "12x40 voxels per slice.*16x16"),
    "sequence frame": (_sequence_frame, {}, "4-D sequence 'cine browser'.*clone"),
    "output is input": (_output_is_input, {}, "overwritten"),
    "output in another scene": (_output_elsewhere, {}, "not in the input's scene"),
    "output is a labelmap": (_output_is_labelmap, {}, "scalar volume node"),
    "batch size": (lambda scene, add: (add(scan()), None, None), {"batch_size": 0}, "batch_size"),
    "degradation": (lambda scene, add: (add(scan()), None, None), {"degradation_override": "fog"}, "'fog'"),
    "mirror": (lambda scene, add: (add(scan()), None, None), {"mirror": "yes"}, "mirror must be True or False"),
    "task": (lambda scene, add: (add(scan()), None, None), {"task": "liver"},
             r"Unknown segmentation task 'liver'; this model's tasks are 'auto' or one of heart\."),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_change_nothing(scene: Any, add_volume: Any, fake_predictor: Any, case: str) -> None:
    build, options, message = REFUSALS[case]
    source, restored, segmentation = build(scene, add_volume)
    restored = restored or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = segmentation or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    before = scene_state(scene)
    with pytest.raises(ValueError, match=message):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation, **options)
    assert scene_state(scene) == before
    assert fake_predictor.calls == 0


def test_mirroring_is_set_for_each_run(add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any) -> None:
    """The widget's checkbox reaches the loaded model, and a run without it does not inherit it."""
    runner, source = VLDUNLogic(predictor=fake_predictor), add_volume(scan())
    runner.process(source, *outputs, mirror=True)
    assert fake_predictor.mirrored == [True]
    runner.process(source, *outputs)
    assert fake_predictor.mirrored == [True, False]


def test_validate_input_accepts_a_plain_scan(add_volume: Any) -> None:
    logic.validate_input(add_volume(scan()))


def test_reexports_load_on_first_use() -> None:
    from VLDUNLib import inference
    from VLDUNLib.degradations import DEGRADATIONS
    from VLDUNLib.logic import Cancelled, Detection

    assert (Cancelled, Detection) == (inference.Cancelled, inference.Detection)
    assert logic.DEGRADATION_CHOICES == list(DEGRADATIONS)
    with pytest.raises(AttributeError):
        logic.NotAThing  # noqa: B018


def test_missing_dependencies_name_pip_requirements(monkeypatch: pytest.MonkeyPatch) -> None:
    assert logic.missing_dependencies() == []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "open_clip" else find_spec(name))
    assert logic.missing_dependencies() == ["open_clip_torch"]


def test_available_devices_offer_auto_first_and_cpu_last() -> None:
    import torch

    devices = logic.available_devices()
    assert devices[0] == "auto" and devices[-1] == "cpu"
    assert ("cuda" in devices) == torch.cuda.is_available()


def test_logic_imports_and_reports_without_torch() -> None:
    """Slicer must be able to offer installing torch, so importing the logic must not need it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import VLDUNLib.logic as logic\n"
        "print(logic.missing_dependencies(), logic.available_devices())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['torch'] ['auto', 'cpu']"


@pytest.mark.parametrize("victim", ["input", "restored", "segmentation"])
def test_node_removed_mid_run_writes_nothing(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any, victim: str
) -> None:
    source = add_volume(scan(), name="scan")
    restored, segmentation = outputs
    nodes = {"input": source, "restored": restored, "segmentation": segmentation}

    def remove_after_first_batch(done: int, total: int, seconds_left: float) -> None:
        if nodes[victim].GetScene() is not None:
            scene.RemoveNode(nodes[victim])

    with pytest.raises(ValueError, match="removed from the scene while VLDUN ran"):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation, progress=remove_after_first_batch,
                                                     batch_size=2)
    assert restored.GetImageData() is None
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_input_edited_mid_run_writes_nothing(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    source = add_volume(scan(), name="scan")
    restored, segmentation = outputs

    def edit(done: int, total: int, seconds_left: float) -> None:
        if done == 2:
            source.SetSpacing(3.0, 3.0, 3.0)

    with pytest.raises(ValueError, match="modified while VLDUN ran"):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation, progress=edit, batch_size=2)
    assert restored.GetImageData() is None


def _mark_completed(segmentation: Any, index: int = 0) -> str:
    segment = segmentation.GetSegmentation().GetNthSegment(index)
    module_logic = slicer.vtkSlicerSegmentationsModuleLogic
    module_logic.SetSegmentStatus(segment, module_logic.Completed)
    return segment.GetName()


@pytest.fixture
def processed(add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any) -> tuple[Any, Any, Any]:
    """(input, restored, segmentation) after one run, as a reviewer finds them before correcting segments."""
    source = add_volume(scan(), name="scan")
    VLDUNLogic(predictor=fake_predictor).process(source, *outputs)
    return (source, *outputs)


def test_completed_segments_are_not_overwritten(scene: Any, processed: tuple[Any, Any, Any], fake_predictor: Any) -> None:
    """Segments a reviewer marked Completed are finished work: a re-run into them is refused, untouched."""
    source, restored, segmentation = processed
    name = _mark_completed(segmentation)
    before, state = exported_labels(scene, segmentation), segment_summary(segmentation)
    with pytest.raises(ValueError, match=f"marked Completed \\({name}\\).*Create new segmentation"):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation)
    assert segment_summary(segmentation) == state
    np.testing.assert_array_equal(exported_labels(scene, segmentation), before)
    assert logic.completed_segments(segmentation) == [name]


def test_segment_completed_mid_run_writes_nothing(processed: tuple[Any, Any, Any], fake_predictor: Any) -> None:
    source, restored, segmentation = processed
    image = restored.GetImageData()

    def complete(done: int, total: int, seconds_left: float) -> None:
        if done == 2:
            _mark_completed(segmentation)

    with pytest.raises(ValueError, match="marked Completed"):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation, progress=complete, batch_size=2)
    assert restored.GetImageData() is image


def _hand_drawn(scene: Any, segmentation: Any, reference: Any) -> None:
    """A segment painted by a user: a labelmap on the reference grid, without VL-DUN's tag."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 10:20, 10:20] = 1
    spec = mrml.SegmentSpec(1, "my lesion", (1.0, 0.0, 0.0), "")
    drawn = mrml.build_segmentation(labels, reference, [spec], surfaces=False)
    drawn.GetNthSegment(0).RemoveTag(mrml.MODEL_TAG)
    mrml.commit_segmentation(segmentation, drawn, reference)


def test_segments_vldun_did_not_make_are_kept_unless_replacing_is_confirmed(
    scene: Any, add_volume: Any, outputs: tuple[Any, Any], fake_predictor: Any
) -> None:
    """Issue 40 #14: a run used to delete hand-drawn segments of the chosen output without asking."""
    source = add_volume(scan(), name="scan")
    restored, segmentation = outputs
    _hand_drawn(scene, segmentation, source)
    assert logic.foreign_segments(segmentation) == ["my lesion"]
    labels = exported_labels(scene, segmentation)
    before = (scene_state(scene), segment_summary(segmentation))

    with pytest.raises(ValueError, match=r"did not make \(my lesion\).*Create new segmentation.*replace_segments=True"):
        VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation)
    assert (scene_state(scene), segment_summary(segmentation)) == before
    np.testing.assert_array_equal(exported_labels(scene, segmentation), labels)

    VLDUNLogic(predictor=fake_predictor).process(source, restored, segmentation, replace_segments=True)
    assert [s[1] for s in segment_summary(segmentation)] == fake_predictor.last.detection.segment_names
    assert logic.foreign_segments(segmentation) == []
