"""The segmentation task is the user's choice: the logic lists a model's tasks from its JSON, passes the chosen
one to the model (in a thread and through the worker process), refuses a task the model lacks before any work,
and in "auto" leaves an unknown scan's segmentation untouched while writing its restored volume, with a note.

Real MRML scenes (slicer-core) and a tiny untrained model of two tasks (model_factory.two_task_predictor).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import slicer
from model_factory import two_task_predictor
from test_logic import digest, exported_labels, scene_state, segment_summary
from VLDUNLib import job as jobs
from VLDUNLib import mrml
from VLDUNLib.logic import VLDUNLogic
from VLDUNLib.terminology import display_name
from VLDUNLib.weights import save_weights

SHAPE = (6, 32, 28)
TASK_CLASSES = {"heart": ["ACDC/RV", "ACDC/MYO", "ACDC/LV"], "brain_tumour": ["BraTS2015/edema", "BraTS2015/enhancing"]}
TASK_LABELS = {"heart": "Heart: ventricles and myocardium", "brain_tumour": "Brain tumour"}


def scan(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, SHAPE).astype(np.float32)


def saved(directory: Path, ood_threshold: float) -> Path:
    predictor = two_task_predictor(ood_threshold)
    path = directory / "two_tasks.safetensors"
    save_weights(predictor.model, predictor.info, path)
    return path


@pytest.fixture(scope="module")
def two_task_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved(tmp_path_factory.mktemp("known"), 0.0)


@pytest.fixture(scope="module")
def flags_every_scan_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved(tmp_path_factory.mktemp("unknown"), 1.01)


@pytest.fixture
def nodes(scene: Any, add_volume: Any) -> tuple[Any, Any, Any]:
    source = add_volume(scan(), spacing=(0.9, 0.9, 4.0), name="scan")
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    return source, restored, segmentation


def segment_names(task: str) -> list[str]:
    return [display_name(key) for key in TASK_CLASSES[task]]


def run_to_end(job: jobs.VLDUNJob, limit_s: float = 300.0) -> jobs.VLDUNJob:
    """start() and poll() as the panel's QTimer does, so the job's status can be read afterwards."""
    job.start()
    deadline = time.monotonic() + limit_s
    while not job.poll():
        assert time.monotonic() < deadline, f"the job did not finish (phase {job.status.phase})"
        time.sleep(0.02)
    return job


def test_the_logic_lists_a_models_tasks_from_its_json_without_loading_the_network(
    two_task_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from VLDUNLib import network, weights

    predictor = two_task_predictor()

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the network was loaded to list the tasks")

    monkeypatch.setattr(weights, "load_model", no_network)
    monkeypatch.setattr(network, "build_model", no_network)
    assert VLDUNLogic(two_task_weights).tasks() == TASK_LABELS
    assert list(VLDUNLogic().tasks()) == ["heart", "brain_tumour", "lung_infection", "abdominal_organs"]
    assert VLDUNLogic(predictor=predictor).tasks() == TASK_LABELS


def test_the_tasks_are_read_in_a_process_without_torch(two_task_weights: Path) -> None:
    """Slicer fills the task selector in its own process, where importing torch would freeze it for seconds."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from VLDUNLib.logic import VLDUNLogic\n"
        f"print(sorted(VLDUNLogic({str(two_task_weights)!r}).tasks()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['brain_tumour', 'heart']"


@pytest.mark.parametrize("task", ["heart", "brain_tumour"])
def test_a_chosen_task_yields_segments_of_its_classes_only(scene: Any, nodes: tuple[Any, Any, Any], task: str) -> None:
    """Both tasks of one model on one scan: "auto" (the detected modality's task) could pass one of them, not both."""
    source, restored, segmentation = nodes
    detection = VLDUNLogic(predictor=two_task_predictor()).process(*nodes, task=task)
    assert detection.task == task and [s.key for s in detection.segments] == TASK_CLASSES[task]
    assert [summary[1] for summary in segment_summary(segmentation)] == segment_names(task)
    assert exported_labels(scene, segmentation).max() <= len(TASK_CLASSES[task])
    assert mrml.volume_geometry(restored) == mrml.volume_geometry(source)


def test_the_worker_segments_the_chosen_task_even_in_a_scan_flagged_unknown(
    nodes: tuple[Any, Any, Any], flags_every_scan_weights: Path
) -> None:
    """The task goes through the worker's request to the real predictor in the worker process: with this model
    "auto" segments nothing, so only the chosen task can make these segments."""
    job = run_to_end(VLDUNLogic(flags_every_scan_weights).job(*nodes, device="cpu", task="brain_tumour"))
    assert job.detection.out_of_distribution
    assert job.detection.task == "brain_tumour" and job.segmented and job.status.note == ""
    assert [summary[1] for summary in segment_summary(nodes[2])] == segment_names("brain_tumour")


def earlier_segmentation(nodes: tuple[Any, Any, Any]) -> None:
    """The outputs as a run on an earlier scan left them (heart segments), and the input is now another scan."""
    VLDUNLogic(predictor=two_task_predictor()).process(*nodes, task="heart")
    slicer.util.updateVolumeFromArray(nodes[0], scan(seed=1))


def assert_restored_and_not_segmented(scene: Any, nodes: tuple[Any, Any, Any], job: jobs.VLDUNJob,
                                      before: tuple[Any, ...]) -> None:
    """The restored volume is the new scan's; the segmentation and the scene's nodes are as `before`."""
    source, restored, segmentation = nodes
    restored_digest, nodes_before, segmentation_state = before
    detection = job.detection
    assert detection.out_of_distribution and detection.segments == [] and detection.task is None
    assert "unlike the training data" in detection.segmentation_note
    assert job.status.note == jobs.UNKNOWN_SCAN_NOTE and not job.segmented
    assert digest(restored) != restored_digest
    assert slicer.util.arrayFromVolume(restored).shape == SHAPE
    assert mrml.volume_geometry(restored) == mrml.volume_geometry(source)
    added = node_ids(scene) - nodes_before
    assert nodes_before <= node_ids(scene), "a node was removed"
    assert all(scene.GetNodeByID(i).IsA("vtkMRMLVolumeDisplayNode") for i in added), "a node besides the display was added"
    assert segmentation_state_of(scene, segmentation) == segmentation_state


def segmentation_state_of(scene: Any, segmentation: Any) -> tuple[Any, ...]:
    labels = exported_labels(scene, segmentation) if segmentation.GetSegmentation().GetNumberOfSegments() else None
    return segment_summary(segmentation), None if labels is None else labels.tobytes(), segmentation.GetMTime()


def node_ids(scene: Any) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def state_before(scene: Any, nodes: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    state = segmentation_state_of(scene, nodes[2])
    return digest(nodes[1]) if nodes[1].GetImageData() else None, node_ids(scene), state


def test_auto_on_an_unknown_scan_writes_the_restored_volume_and_leaves_the_segmentation(
    scene: Any, nodes: tuple[Any, Any, Any]
) -> None:
    earlier_segmentation(nodes)
    before = state_before(scene, nodes)
    assert before[2][0], "the earlier run left no segments to keep"
    job = run_to_end(VLDUNLogic(predictor=two_task_predictor(ood_threshold=1.01)).job(*nodes))
    assert_restored_and_not_segmented(scene, nodes, job, before)


def test_auto_on_an_unknown_scan_in_the_worker_creates_no_empty_segmentation(
    scene: Any, nodes: tuple[Any, Any, Any], flags_every_scan_weights: Path
) -> None:
    """Through the worker process: the note comes back with the detection, an empty output stays untouched."""
    before = state_before(scene, nodes)
    job = run_to_end(VLDUNLogic(flags_every_scan_weights).job(*nodes, device="cpu"))
    assert_restored_and_not_segmented(scene, nodes, job, before)
    assert nodes[2].GetSegmentation().GetNumberOfSegments() == 0


def test_a_task_the_model_lacks_is_refused_before_the_worker_starts(
    scene: Any, nodes: tuple[Any, Any, Any], two_task_weights: Path
) -> None:
    before = scene_state(scene)
    job = VLDUNLogic(two_task_weights).job(*nodes, task="liver")
    with pytest.raises(ValueError, match=r"Unknown segmentation task 'liver'.*'auto' or one of heart, brain_tumour\."):
        job.start()
    assert job.compute.process is None, "the worker was started"
    assert scene_state(scene) == before


def test_a_task_the_predictor_lacks_is_refused_before_it_runs(nodes: tuple[Any, Any, Any]) -> None:
    predictor = two_task_predictor()
    calls: list[str] = []
    predictor.predict = lambda *args, **kwargs: calls.append("predict")  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"Unknown segmentation task 'lung_infection'.*heart, brain_tumour"):
        VLDUNLogic(predictor=predictor).process(*nodes, task="lung_infection")
    assert calls == []
