"""VLDUNJob with its worker process, on real MRML nodes (slicer-core): poll() never blocks, cancel takes effect
within a second at every phase, failures become one-line errors, and the scene changes only on success.

The worker runs the doubles of worker_doubles.py (timed like the real model's phases), and once the shipped
weights themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import slicer
from test_logic import digest, scene_state, segment_summary

from VLDUNLib import job as jobs
from VLDUNLib import mrml
from VLDUNLib.logic import VLDUNLogic
from VLDUNLib.results import Cancelled

TESTS = Path(__file__).resolve().parent
MAX_POLL_S = 0.05
MAX_CANCEL_S = 1.0
SHAPE = (24, 64, 64)


@pytest.fixture(autouse=True)
def doubles_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker imports worker_doubles from this folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


@pytest.fixture
def nodes(scene: Any, add_volume: Any) -> tuple[Any, Any, Any]:
    values = np.random.default_rng(0).normal(100.0, 20.0, SHAPE).astype(np.float32)
    source = add_volume(values, spacing=(0.8, 0.8, 3.0), name="scan")
    restored = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    return source, restored, segmentation


def make_job(nodes: tuple[Any, Any, Any], factory: str | None = "slow", **options: Any) -> jobs.VLDUNJob:
    factory = None if factory is None else f"worker_doubles:{factory}"
    settings = jobs.JobOptions(predictor_factory=factory, batch_size=4, **options)
    return jobs.VLDUNJob(*nodes, settings)


def timed_polls(job: jobs.VLDUNJob, until: Any = None, limit_s: float = 600.0) -> list[tuple[str, float]]:
    """Poll as a QTimer would until the job finishes (or `until(job)`); the phase and duration of every poll."""
    polls, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if until is not None and until(job):
            return polls
        start = time.perf_counter()
        finished = job.poll()
        polls.append((job.status.phase, time.perf_counter() - start))
        if finished:
            return polls
        time.sleep(0.01)
    raise AssertionError(f"the job did not get there in {limit_s} s (phase {job.status.phase})")


def longest(polls: list[tuple[str, float]]) -> tuple[str, float]:
    return max(polls, key=lambda poll: poll[1])


def test_no_poll_blocks_during_a_whole_run(scene: Any, nodes: tuple[Any, Any, Any]) -> None:
    job = make_job(nodes)
    job.start()
    polls = timed_polls(job)
    phases = {phase for phase, _ in polls}
    assert {"loading the model", "segmenting", "writing the outputs", "done"} <= phases
    phase, seconds = longest(polls)
    assert seconds < MAX_POLL_S, f"a poll in phase {phase!r} took {seconds * 1000:.1f} ms"
    source, restored, segmentation = nodes
    assert mrml.volume_geometry(restored) == mrml.volume_geometry(source)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(restored), slicer.util.arrayFromVolume(source) * 0.5)
    assert [s[1] for s in segment_summary(segmentation)] == job.detection.segment_names
    assert job.compute.directory.exists() is False
    display = restored.GetDisplayNode()  # the window was staged, so the commit computed no histogram
    low, high = mrml.display_range(slicer.util.arrayFromVolume(restored))
    assert not display.GetAutoWindowLevel() and display.GetWindow() == pytest.approx(high - low)


def test_real_model_run_keeps_every_poll_short(scene: Any, nodes: tuple[Any, Any, Any]) -> None:
    """The shipped weights in the worker: loading torch and the model, the prior and the batches all happen there."""
    job = make_job(nodes, factory=None, device="cpu")
    job.start()
    polls = timed_polls(job)
    phase, seconds = longest(polls)
    print(f"\nreal model, {SHAPE}: {len(polls)} polls, longest {seconds * 1000:.1f} ms in phase {phase!r}")
    assert seconds < MAX_POLL_S, f"a poll in phase {phase!r} took {seconds * 1000:.1f} ms"
    assert job.status.phase == "done"
    assert nodes[2].GetSegmentation().GetNumberOfSegments() == len(job.detection.segments)


def _segmenting(job: jobs.VLDUNJob) -> bool:
    return job.status.done > 0


def _loading(job: jobs.VLDUNJob) -> bool:
    return job.status.phase == "loading the model"


def _writing(job: jobs.VLDUNJob) -> bool:
    return job.status.phase == "writing the outputs"


@pytest.mark.parametrize("reached", [None, _loading, _segmenting, _writing], ids=["start", "load", "batches", "write"])
def test_cancel_takes_effect_within_a_second_and_leaves_the_scene(
    scene: Any, nodes: tuple[Any, Any, Any], reached: Any
) -> None:
    job = make_job(nodes)
    before = scene_state(scene)
    job.start()
    if reached is not None:
        timed_polls(job, until=reached)
    if reached is _writing:
        job.poll()  # one write step staged: still nothing in the scene
    phase, start = job.status.phase, time.perf_counter()
    job.cancel()
    latency = time.perf_counter() - start
    print(f"\ncancel while {phase!r}: {latency * 1000:.0f} ms")
    assert latency < MAX_CANCEL_S
    assert job.compute.process.poll() is not None, "the worker still runs"
    assert not job.compute.directory.exists()
    with pytest.raises(Cancelled):
        job.poll()
    assert scene_state(scene) == before
    assert nodes[1].GetImageData() is None
    assert nodes[2].GetSegmentation().GetNumberOfSegments() == 0


def test_cancel_after_an_earlier_run_keeps_its_outputs(scene: Any, nodes: tuple[Any, Any, Any]) -> None:
    first = make_job(nodes)
    first.start()
    timed_polls(first)
    restored, segmentation = nodes[1:]
    before = (scene_state(scene), digest(restored), segment_summary(segmentation))
    second = make_job(nodes)
    second.start()
    timed_polls(second, until=_segmenting)
    second.cancel()
    assert (scene_state(scene), digest(restored), segment_summary(segmentation)) == before


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        ("crashing", jobs.WorkerFailed, r"ended unexpectedly \(exit code 9: simulated native crash in the model\).*"
                                        r"Press Apply again"),
        ("raising", jobs.WorkerFailed, r"RuntimeError: tensor shapes do not match\. Nothing was changed"),
        ("out_of_memory", jobs.GpuOutOfMemory, r"GPU ran out of memory even one slice at a time.*'cpu'"),
    ],
)
def test_worker_failure_is_one_clear_line_and_changes_nothing(
    scene: Any, nodes: tuple[Any, Any, Any], factory: str, error: type, message: str
) -> None:
    job = make_job(nodes, factory)
    before = scene_state(scene)
    job.start()
    with pytest.raises(error, match=message) as caught:
        timed_polls(job)
    assert "\n" not in str(caught.value)
    assert job.status.phase == "failed"
    assert scene_state(scene) == before
    assert not job.compute.directory.exists()
    job.compute.process.wait(1)  # told to end, not waited for: a poll never blocks


def test_worker_refusal_is_a_value_error(scene: Any, nodes: tuple[Any, Any, Any]) -> None:
    """Weights that do not exist are found in the worker; the message is the library's, nothing is changed."""
    job = make_job(nodes, factory=None, weights="/nonexistent/model.safetensors", device="cpu")
    before = scene_state(scene)
    job.start()
    with pytest.raises((ValueError, jobs.WorkerFailed), match="model.safetensors"):
        timed_polls(job)
    assert scene_state(scene) == before


PARENT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import slicer, slicer.util
    from VLDUNLib import job as jobs

    scene = slicer.vtkMRMLScene()
    source = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    slicer.util.updateVolumeFromArray(source, np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32))
    outputs = (scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"), scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    job = jobs.VLDUNJob(source, *outputs, jobs.JobOptions(predictor_factory="worker_doubles:slow"))
    job.start()
    print(job.compute.pid, flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, not yet reaped by a container's init) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see whether the worker runs")
def test_worker_dies_with_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLDUN_TEST_LOAD_S", "60")
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its parent"
    finally:
        parent.kill()


def test_logic_process_runs_the_job_to_the_end(scene: Any, nodes: tuple[Any, Any, Any], monkeypatch: Any) -> None:
    """The synchronous API for scripts is the same job: worker, progress and cancel included."""
    seen: list[tuple[int, int]] = []
    runner = VLDUNLogic()
    made = runner.job

    def with_double(*args: Any, **kwargs: Any) -> jobs.VLDUNJob:
        job = made(*args, **kwargs)
        job.options = job.compute.options = jobs.JobOptions(**{**job.options.__dict__, "predictor_factory": "worker_doubles:slow"})
        return job

    monkeypatch.setattr(runner, "job", with_double)
    detection = runner.process(*nodes, batch_size=8, progress=lambda done, total, left: seen.append((done, total)))
    assert seen == [(8, 24), (16, 24), (24, 24)]
    assert detection.segment_names == ["right ventricle cavity", "myocardium", "left ventricle cavity"]
    before = scene_state(scene)
    with pytest.raises(Cancelled):
        runner.process(*nodes, should_cancel=lambda: True)
    assert scene_state(scene) == before
