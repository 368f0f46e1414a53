"""One VL-DUN run on volume nodes that never blocks its caller: `start()`, then `poll()` from a timer, `cancel()` any time.

The model runs in a worker process (`python -m VLDUNLib.worker`; PythonSlicer inside Slicer), as
Slicer's nnU-Net and TotalSegmentator extensions do: Slicer's GUI thread stays free while the model
loads and runs, and Cancel ends the process at once instead of waiting for a batch. The input goes to
the worker as a .npy file in a temporary folder; the results come back the same way.

MRML is read and written only by the thread that calls the job (Slicer's GUI thread): `start()` checks
everything and reads the input; `poll()` reads the worker's messages and, once the prediction is there,
writes the outputs in short steps, one per call, committing both outputs in the last one. Until that
commit, a cancel or a failure leaves the scene exactly as it was. A scan the model left unsegmented (task
"auto" on an unknown scan) gets its restored volume only: the output segmentation is not touched, and
`JobStatus.note` says why and how to segment it anyway.

This module imports neither torch nor Qt: importing torch in Slicer's process would freeze it for seconds.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import slicer
import slicer.util

from . import mrml
from .checks import (
    Predictor,
    check_options,
    check_task,
    model_tasks,
    validate_input,
    validate_outputs,
)
from .results import Cancelled, Detection, Prediction, SegmentClass
from .tasks import AUTO
from .terminology import segment_style
from .worker import INPUT_FILE, LABELS_FILE, REQUEST_FILE, RESTORED_FILE

LOG_FILE = "worker.log"

STOP_WAIT_S = 0.5
"""How long a stopping worker may take before it is killed (a cancel must take effect within 1 s)."""

Message = tuple[str, Any]
"""(kind, payload): ("phase", text), ("progress", (done, total)), ("result", Prediction), ("error", exception)."""

ProgressCallback = Callable[[int, int, float], None]
"""progress(slices_done, slices_total, seconds_left)."""


class WorkerFailed(RuntimeError):
    """The model's process failed or ended unexpectedly; the message is one line that says what to do."""


class GpuOutOfMemory(WorkerFailed):
    """The GPU ran out of memory even one slice at a time; the same run fits on the CPU."""


@dataclass(frozen=True)
class JobOptions:
    weights: str | None = None
    """A .safetensors file; None: the shipped model."""
    device: str = "auto"
    degradation_override: str | None = None
    batch_size: int = 8
    mirror: bool = False
    replace_segments: bool = False
    """Allow replacing segments of the output segmentation that VL-DUN did not make (`logic.foreign_segments`)."""
    task: str = AUTO
    """The classes to segment: a task id of the model (`logic.VLDUNLogic.tasks`), or "auto" for the detected
    modality's task, which leaves an unknown scan unsegmented."""
    predictor_factory: str | None = None
    """"module:function" called as function(weights, device) in the worker instead of loading VL-DUN (tests)."""


@dataclass
class JobStatus:
    phase: str
    """"starting", "loading the model", "segmenting", "writing the outputs", "done", "cancelled" or "failed"."""
    done: int = 0
    total: int = 0
    seconds_left: float = math.inf
    note: str = ""
    """Once done: why the scan was not segmented and what to do, for the panel; empty when it was segmented."""


UNKNOWN_SCAN_NOTE = "Unknown scan: not segmented. Choose a segmentation task to segment it anyway."


def segmentation_note(detection: Detection) -> str:
    """What a person in Slicer reads about a run that wrote no segmentation (the library's own
    `Detection.segmentation_note` names command-line options); empty when the run segmented."""
    if detection.segments:
        return ""
    if detection.out_of_distribution:
        return UNKNOWN_SCAN_NOTE
    return (f"No segmentation task matches the detected modality ({detection.modality}): not segmented. "
            "Choose a segmentation task to segment it anyway.")


class Compute(Protocol):
    """Where the prediction runs; every method returns at once."""

    def start(self, slices: np.ndarray) -> None: ...

    def messages(self) -> list[Message]: ...

    def stop(self, wait: bool = True) -> None:
        """End the computation; `wait`: until it has ended (a cancel), else just tell it to (it is finishing)."""

    def tasks(self) -> dict[str, str]:
        """Task id -> readable label of the model that will run, for checking a chosen task before it starts."""


def worker_python() -> str:
    """The interpreter for the worker: PythonSlicer in the Slicer application (whose sys.executable is Slicer itself)."""
    if not hasattr(slicer, "app"):
        return sys.executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    beside = [Path(sys.executable).with_name(name) for name in names]
    found = shutil.which("PythonSlicer") or next((str(path) for path in beside if path.is_file()), None)
    if found is None:
        raise WorkerFailed("PythonSlicer was not found next to Slicer or on the PATH; reinstall Slicer.")
    return found


def _bootstrap() -> str:
    """Worker start-up code that finds VLDUNLib wherever the extension is installed, without PYTHONPATH."""
    package_parent = str(Path(__file__).resolve().parents[1])
    return f"import sys; sys.path.insert(0, {package_parent!r}); from VLDUNLib.worker import main; main(sys.argv[1:])"


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class WorkerProcess:
    """Runs the model in a separate Python process and reads its JSON-line messages in a reader thread."""

    def __init__(self, options: JobOptions, python: str | None = None) -> None:
        self.options = options
        self.python = python
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._reported = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def tasks(self) -> dict[str, str]:
        """Read from the weights' JSON in this process, so a wrong task is refused before the worker starts."""
        return model_tasks(self.options.weights)

    def start(self, slices: np.ndarray) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="vldun-"))
        np.save(self.directory / INPUT_FILE, np.ascontiguousarray(slices))
        (self.directory / REQUEST_FILE).write_text(json.dumps(asdict(self.options)), encoding="utf-8")
        flags = subprocess.CREATE_NO_WINDOW if os.name == "nt" else 0
        with open(self.directory / LOG_FILE, "wb") as log:
            self.process = subprocess.Popen(
                [self.python or worker_python(), "-c", _bootstrap(), str(self.directory)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, creationflags=flags,
            )
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        """Reader thread: queue every JSON line, then None at end of output (the worker ended)."""
        for line in stream:
            try:
                self._queue.put(json.loads(line))
            except ValueError:
                continue
        self._queue.put(None)

    def messages(self) -> list[Message]:
        messages: list[Message] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._ended = True
            else:
                messages.append(self._message(item))
        self._reported = self._reported or any(kind in ("result", "error") for kind, _ in messages)
        if self._ended and not self._reported and self.process.poll() is not None:
            messages.append(("error", self._crash()))
            self._reported = True
        if any(kind == "error" for kind, _ in messages):
            self._show_log()
        return messages

    def _show_log(self) -> None:
        """The worker's traceback, into this process's stderr (Slicer's Python console), before its folder goes."""
        text = (self.directory / LOG_FILE).read_text(encoding="utf-8", errors="replace").strip()
        if text:
            print(f"VL-DUN worker output:\n{text}", file=sys.stderr)

    def _message(self, item: dict[str, Any]) -> Message:
        if "result" in item:
            return "result", Prediction(
                np.load(self.directory / RESTORED_FILE, mmap_mode="r"),
                np.load(self.directory / LABELS_FILE, mmap_mode="r"),
                Detection.from_json(item["result"]),
            )
        if "error" in item:
            kinds = {"invalid": ValueError, "out_of_memory": GpuOutOfMemory}
            return "error", kinds.get(item["kind"], WorkerFailed)(item["error"])
        if "progress" in item:
            return "progress", tuple(item["progress"])
        return "phase", item["phase"]

    def _crash(self) -> WorkerFailed:
        code = self.process.returncode
        last = _last_line(self.directory / LOG_FILE) or "no error message"
        return WorkerFailed(
            f"The VL-DUN worker process ended unexpectedly (exit code {code}: {last}); nothing was changed. "
            "Press Apply again; if it recurs, choose the device 'cpu' or a smaller volume."
        )

    def stop(self, wait: bool = True) -> None:
        """End the worker (closing its stdin makes it exit; terminate and kill are the fallbacks), drop the files."""
        if self.process is not None:
            self.process.stdin.close()
        if self.process is not None and wait:
            try:
                self.process.wait(STOP_WAIT_S / 2)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(STOP_WAIT_S / 2)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


class InThread:
    """Runs a given predictor object in a thread of this process: for scripts and tests that bring their own."""

    def __init__(self, predictor: Predictor, options: JobOptions) -> None:
        self.predictor = predictor
        self.options = options
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tasks(self) -> dict[str, str]:
        return self.predictor.tasks()

    def start(self, slices: np.ndarray) -> None:
        self._thread = threading.Thread(target=self._run, args=(slices,), daemon=True)
        self._thread.start()

    def _run(self, slices: np.ndarray) -> None:
        try:
            self._queue.put(("phase", "segmenting"))
            self.predictor.mirror = self.options.mirror
            prediction = self.predictor.predict(
                slices,
                batch_size=self.options.batch_size,
                progress=lambda done, total: self._queue.put(("progress", (done, total))),
                should_cancel=self._stop.is_set,
                degradation_override=self.options.degradation_override,
                task=self.options.task,
            )
            self._queue.put(("result", prediction))
        except BaseException as error:  # noqa: BLE001 (handed to the caller's thread, which raises it)
            self._queue.put(("error", error))

    def messages(self) -> list[Message]:
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(STOP_WAIT_S)


def content_stamp(node: slicer.vtkMRMLScalarVolumeNode) -> tuple[int, int]:
    """What changes when the input's voxels or geometry change (image data and node modified times)."""
    image = node.GetImageData()
    return (image.GetMTime() if image is not None else 0, node.GetMTime())


def in_memory(array: np.ndarray, chunk_bytes: int = 4 << 20) -> Generator[None, None, np.ndarray]:
    """Generator: copy `array` (a worker's memory-mapped result) into memory a few MB per step, so that no poll
    waits for the disk; its return value is the copy."""
    copy = np.empty(array.shape, array.dtype)
    step = max(1, chunk_bytes // max(1, array[:1].nbytes))
    for start in range(0, len(array), step):
        copy[start : start + step] = array[start : start + step]
        yield
    return copy


def _read_only(array: np.ndarray) -> np.ndarray:
    """The input's voxels as the model sees them: a view that cannot write into the input node."""
    view = array.view()
    view.flags.writeable = False
    return view


def _segment_spec(segment: SegmentClass) -> mrml.SegmentSpec:
    """Name from the model (it is what the detection reports); colour and codes from the terminology table."""
    _, color, entry = segment_style(segment.key, segment.label)
    return mrml.SegmentSpec(segment.label, segment.name, color, entry)


def _node_label(node: slicer.vtkMRMLNode) -> str:
    return f"'{node.GetName()}'"


class VLDUNJob:
    """Restore `inputVolume` into `outputVolume` and segment it into `outputSegmentation`, without blocking.

    `start()` raises ValueError for unusable input or outputs (nothing changed). Then call `poll()` until it
    returns True; it raises what made the run fail (ValueError, `WorkerFailed`, `GpuOutOfMemory`) with the
    scene unchanged. `cancel()` stops the run within a second and leaves the scene unchanged. `detection`
    holds what the prior detected once the run is done; `segmented` says whether the segmentation was written.
    """

    def __init__(
        self,
        inputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputVolume: slicer.vtkMRMLScalarVolumeNode,
        outputSegmentation: slicer.vtkMRMLSegmentationNode,
        options: JobOptions,
        compute: Compute | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """`compute`: where the model runs (default: a `WorkerProcess`); `progress` is called from `poll()`."""
        self.nodes = (inputVolume, outputVolume, outputSegmentation)
        self.options = options
        self.compute = compute if compute is not None else WorkerProcess(options)
        self.progress = progress
        self.status = JobStatus("starting")
        self.detection: Detection | None = None
        self._writer: Iterator[None] | None = None
        self._started = 0.0
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def segmented(self) -> bool:
        """The run finished and wrote the output segmentation (an unknown scan in "auto" leaves it untouched)."""
        return self._finished and bool(self.detection.segments)

    def start(self) -> None:
        inputVolume, outputVolume, outputSegmentation = self.nodes
        validate_input(inputVolume)
        validate_outputs(inputVolume, outputVolume, outputSegmentation, self.options.replace_segments)
        check_options(self.options.batch_size, self.options.degradation_override, self.options.mirror)
        check_task(self.options.task, self.compute.tasks)
        self._axis = mrml.slice_axis(inputVolume)
        self._scene, self._stamp = inputVolume.GetScene(), content_stamp(inputVolume)
        slices = mrml.volume_to_slices(_read_only(slicer.util.arrayFromVolume(inputVolume)), self._axis)
        self._started = time.monotonic()
        self.compute.start(slices)

    def poll(self) -> bool:
        """Take the worker's news or do one write step; True once both outputs are written. Returns quickly."""
        if self._finished:
            return True
        if self.status.phase == "cancelled":
            raise Cancelled("Cancelled; nothing was written.")
        try:
            if self._writer is None:
                for kind, payload in self.compute.messages():
                    self._take(kind, payload)
            else:
                self._write_step()
        except BaseException:
            self.status.phase = "failed"
            self.compute.stop(wait=False)
            raise
        return self._finished

    def cancel(self) -> None:
        """Stop the run now; the outputs are committed in one poll step, so before it nothing has changed."""
        if self._finished or self.status.phase in ("cancelled", "failed"):
            return
        self.status.phase = "cancelled"
        self._writer = None
        self.compute.stop()

    def _take(self, kind: str, payload: Any) -> None:
        if kind == "error":
            raise payload
        if kind == "phase":
            self.status.phase = payload
            if payload == "segmenting":
                self._started = time.monotonic()
        elif kind == "progress":
            self._report(*payload)
        elif kind == "result":
            self.status.phase = "writing the outputs"
            self._writer = self._write(payload)

    def _report(self, done: int, total: int) -> None:
        """Seconds left are extrapolated from the mean time per slice since segmenting began."""
        elapsed = time.monotonic() - self._started
        self.status.done, self.status.total = done, total
        self.status.seconds_left = elapsed / max(done, 1) * (total - done)
        if self.progress is not None:
            self.progress(done, total, self.status.seconds_left)

    def _write_step(self) -> None:
        try:
            next(self._writer)
        except StopIteration:
            self._writer = None
            self._finished = True
            self.status.phase = "done"
            self.compute.stop(wait=False)

    def _write(self, prediction: Prediction) -> Iterator[None]:
        """The outputs, staged off the scene over several polls and committed together in the last one; without
        segments (an unknown scan in "auto") only the restored volume, and the segmentation stays as it was.

        The segments' closed surfaces (3-D display) are left to the caller: making them takes 0.6 s for
        100 x 256 x 256 voxels and VTK holds Python's lock meanwhile, so no poll-sized step exists for them.
        """
        inputVolume, outputVolume, outputSegmentation = self.nodes
        self._check_scene()
        restored = yield from in_memory(prediction.restored)
        labels = yield from in_memory(prediction.labels)
        image = mrml.volume_image(mrml.slices_to_volume(restored, self._axis), inputVolume)
        yield
        window = mrml.display_range(restored)
        yield
        staged = self._staged_segmentation(labels, prediction.detection)
        yield
        self._check_scene()
        with mrml.outputs_restored_on_failure(outputVolume, outputSegmentation):
            mrml.commit_scalar_volume(outputVolume, image, inputVolume, window)
            if staged is not None:
                mrml.commit_segmentation(outputSegmentation, staged, inputVolume)
        self.detection = prediction.detection
        self.status.note = segmentation_note(prediction.detection)

    def _staged_segmentation(self, labels: np.ndarray, detection: Detection) -> slicer.vtkSegmentation | None:
        """The segments to commit, off the scene; None when the model segmented nothing (no empty segmentation)."""
        if not detection.segments:
            return None
        segments = [_segment_spec(segment) for segment in detection.segments]
        return mrml.build_segmentation(mrml.slices_to_volume(labels, self._axis), self.nodes[0], segments, surfaces=False)

    def _check_scene(self) -> None:
        """Nodes removed, the input edited or segments finished while the model ran: write nothing rather than
        something stale or over someone's work."""
        scene, nodes = self._scene, self.nodes
        for node in nodes:
            if node.GetScene() is not scene or scene.GetNodeByID(node.GetID()) is not node:
                raise ValueError(f"{_node_label(node)} was removed from the scene while VLDUN ran; nothing was "
                                 "written. Select the nodes again and re-run.")
        if content_stamp(nodes[0]) != self._stamp:
            raise ValueError(f"{_node_label(nodes[0])} was modified while VLDUN ran; nothing was written. Re-run on "
                             "the current data.")
        validate_outputs(*nodes, self.options.replace_segments)


def run(job: VLDUNJob, should_cancel: Callable[[], bool] | None = None, interval: float = 0.02) -> Detection:
    """Run a job to the end in the calling thread, for scripts: the synchronous form of start/poll/cancel."""
    job.start()
    try:
        while True:
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled by the caller; nothing was written.")
            if job.poll():
                return job.detection
            time.sleep(interval)
    except BaseException:
        job.cancel()
        raise

