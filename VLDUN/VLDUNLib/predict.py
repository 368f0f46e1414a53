"""`vldun predict`: restore and segment volume files headless, one scan or a whole cohort.

Outputs keep the input's exact geometry (origin, spacing, direction): `restored.<ext>` in the input's
intensity scale, `segmentation.<ext>` (uint8 labels) and `detection.json` with the detected modality
and degradation and the label names. One input file writes them into the output folder itself; several
files, or folders of them, write one subfolder per case and `summary.csv`, with the model loaded once.
`detection.json` is written last and marks a finished case: a rerun skips finished cases (resuming an
interrupted cohort) unless asked to overwrite, and a case that fails is reported and the others still run.
On a CPU, `workers` processes share the cores and take cases in turn (see `predict_cohort`).

Nothing lost, nothing corrupt marked done:
- Every file is written to a temporary file in its folder, checked (size; read back and compared voxel for
  voxel, so a short write that ITK only prints about is caught) and then renamed over the target. `--overwrite`
  removes the old `detection.json` before it writes anything, and the new one is written last.
- `detection.json` records what produced it (`produced_by`: the input's path, size and SHA-256, the weights'
  and their config's SHA-256, and the options that change outputs). A rerun skips a case only when all of it
  matches and both volumes are intact; otherwise it redoes the case and says why.
- Before any work: every input exists (broken links are named), NIfTI files are as long as their header says,
  no input is one of the tool's own outputs (restored.*, segmentation.*, a folder with detection.json) and no
  output would overwrite an input, the weights are verified and `--out` is writable. Before each case's
  prediction: slices of at least 16 x 16 pixels, finite values within float32's range, and not a label map
  (an integer volume with at most 16 distinct values is refused unless `allow_label_maps`).
- Worker processes end themselves when the main process dies.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import slices_to_volume, through_plane_axis, volume_to_slices
from .inference import VolumePredictor, resolve_device
from .nifti import nifti_size_problem
from .results import degradation_text, modality_text

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
OUTPUT_NAMES = ("restored", "segmentation")
MARKER = "detection.json"
MIN_SLICE = 16
"""Smallest in-plane size, in pixels, restored (the Slicer module refuses smaller slices too)."""
LABEL_MAP_VALUES = 16
"""An integer volume with at most this many distinct values is taken for a label map or mask."""
FLOAT32_MAX = float(np.finfo(np.float32).max)


def output_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path.name}: unsupported file type; use one of {', '.join(SUFFIXES)}.")


def read_volume(path: Path) -> sitk.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.name.lower().endswith((".nii", ".nii.gz")) and (problem := nifti_size_problem(path)):
        raise ValueError(f"{problem}.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].removeprefix("sitk::ERROR: ")
        raise ValueError(f"{path.name} could not be read ({reason}); check that the file is complete and is a "
                         f"volume in one of {', '.join(SUFFIXES)}.") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "VLDUN restores single-channel scalar volumes: extract one channel first.")
    if image.GetDimension() not in (2, 3):
        raise ValueError(f"{path.name} is {image.GetDimension()}-D; pass one 3-D volume (extract a time point first).")
    return image if image.GetDimension() == 3 else sitk.JoinSeries(image)


def slice_axis_of(image: sitk.Image) -> int:
    """Through-plane numpy axis of `GetArrayFromImage(image)` (K, J, I order)."""
    directions = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, ::-1]
    return through_plane_axis(image.GetSize()[::-1], image.GetSpacing()[::-1], directions)


def case_name(path: Path) -> str:
    """The file name without its volume suffix: `case_0001.nii.gz` -> `case_0001`."""
    return path.name[: -len(output_suffix(path))]


def find_inputs(paths: list[Path]) -> list[Path]:
    """The volume files named, with each folder replaced by the volume files directly inside it (sorted).

    Raises before anything runs: a path that does not exist, a folder without volumes, or two inputs with
    the same case name (their outputs would overwrite each other).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            if (path / MARKER).exists():
                raise ValueError(f"{path} holds {MARKER}: it is an output folder of vldun predict, not scans; "
                                 "name the original scans.")
            named = sorted(p for p in path.iterdir() if p.name.lower().endswith(SUFFIXES) and not p.is_dir())
            broken = [p.name for p in named if not p.is_file()]
            if broken:
                raise ValueError(f"{path}: {', '.join(broken)} cannot be opened (a broken or looping link, or not "
                                 "a regular file); fix or remove them, so that no case is silently left out.")
            if not named:
                raise ValueError(f"{path} holds no volume files ({', '.join(SUFFIXES)}).")
            files.extend(named)
        elif path.is_file():
            output_suffix(path)
            files.append(path)
        elif path.is_symlink():
            raise FileNotFoundError(f"{path} is a broken or looping link.")
        else:
            raise FileNotFoundError(f"{path} does not exist.")
    for path in files:
        if case_name(path) in OUTPUT_NAMES or (path.parent / MARKER).exists():
            raise ValueError(f"{path} is an output of vldun predict ({case_name(path)}{output_suffix(path)} "
                             f"beside {MARKER}), not a scan; name the original scan instead.")
    seen: dict[str, Path] = {}
    for path in files:
        name = case_name(path)
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} are both case {name!r}, whose outputs would overwrite each "
                             "other; rename one or run them into different output folders.")
        seen[name] = path
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


OUTPUT_OPTIONS = ("degradation", "mirror", "task", "allow_label_maps")
"""Settings that change a case's outputs (batch size and device do not); recorded in its marker."""


def weights_identity(weights: str | None, task: str = "auto") -> dict[str, str]:
    """The verified SHA-256s of a model's tensors and config; raises `WeightsError` (a ValueError) up front
    for a corrupt, edited or missing model, or a ValueError for a task the model has not, before any case runs."""
    from safetensors import safe_open

    from .weights import DEFAULT_WEIGHTS, WeightsError, config_path_for, read_model_info

    path, info = read_model_info(weights or DEFAULT_WEIGHTS)
    if task != "auto" and task not in info.tasks:
        raise ValueError(f"Unknown task {task!r}; this model's tasks are auto, {', '.join(info.tasks)}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            handle.keys()
    except Exception as error:  # safetensors' own SafetensorError for a corrupt header
        raise WeightsError(f"{path.name} could not be read as safetensors ({error}); copy the model again.") from None
    meta = json.loads(config_path_for(path).read_text())
    return {"weights_sha256": meta["sha256"], "config_sha256": meta["config_sha256"]}


def provenance(path: Path, model: dict[str, str], settings: Settings) -> dict[str, object]:
    """What produced a case's outputs: recorded in its marker and compared on a rerun."""
    options = {k: getattr(settings, k) for k in OUTPUT_OPTIONS if hasattr(settings, k)}
    return {"input": str(path.resolve()), "input_size": path.stat().st_size, "input_sha256": file_sha256(path),
            **model, "options": options}


def finished(out: Path, path: Path, expected: dict[str, object] | None = None) -> dict[str, object] | None:
    """The detection of `path` when `out` holds its finished outputs, else None (see `why_not_finished`)."""
    return None if why_not_finished(out, path, expected)[0] else why_not_finished(out, path, expected)[1]


def why_not_finished(out: Path, path: Path, expected: dict[str, object] | None = None
                     ) -> tuple[str | None, dict[str, object] | None]:
    """(None, detection) when `out` holds complete outputs of `path` made as `expected` says; else (reason, None),
    the reason empty when there is no marker at all."""
    try:
        detection = json.loads((out / MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return ("", None) if not (out / MARKER).exists() else (f"its {MARKER} is unreadable", None)
    if not isinstance(detection, dict) or detection.get("input") != str(path.resolve()):
        return "its outputs belong to another input", None
    recorded = detection.get("produced_by")
    if expected is not None:
        if not isinstance(recorded, dict):
            return "its outputs do not record what produced them", None
        changed = sorted({k for k in {*expected, *recorded} if expected.get(k) != recorded.get(k)}
                         - {"input"})
        if changed:
            return f"it was done with a different {', '.join(changed)}", None
    suffix = output_suffix(path)
    for name in OUTPUT_NAMES:
        volume = out / f"{name}{suffix}"
        if not volume.is_file() or volume.stat().st_size == 0 or (
                suffix in (".nii", ".nii.gz") and nifti_size_problem(volume)):
            return f"{volume.name} is missing or incomplete", None
    return None, detection


def _temp_beside(path: Path) -> Path:
    """A temporary name in `path`'s folder that keeps its suffix (ITK picks the writer by it)."""
    return path.with_name(f".partial-{os.getpid()}-{path.name}")


def _remove_stale_temps(folder: Path) -> None:
    for stale in folder.glob(".partial-*"):
        stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_volume(image: sitk.Image, path: Path) -> None:
    """Write `image` to `path` atomically and checked: to a temporary file beside it, read back and compared
    voxel for voxel (ITK only prints when a write falls short: full disk, quota, file-size limit), then renamed."""
    temp = _temp_beside(path)
    try:
        sitk.WriteImage(image, str(temp), useCompression=True)
        problem = None
        if not temp.is_file() or temp.stat().st_size == 0:
            problem = "nothing was written"
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            problem = nifti_size_problem(temp)
        if problem is None:
            try:
                back = sitk.ReadImage(str(temp))
            except RuntimeError as error:
                problem = f"it cannot be read back ({str(error).strip().splitlines()[-1]})"
            else:
                if back.GetSize() != image.GetSize() or not np.array_equal(
                        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image), equal_nan=True):
                    problem = "what was read back differs from what was written"
        if problem is not None:
            raise OSError(f"writing {path} failed: {problem}; is the disk full, or a quota or file-size limit "
                          "reached?")
        _fsync(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json(data: object, path: Path) -> None:
    """Write strict JSON (no NaN) atomically: temporary file, checked, flushed, renamed."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    temp = _temp_beside(path)
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if temp.read_text() != text:
            raise OSError(f"writing {path} failed: what was read back differs; is the disk full?")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def check_voxels(path: Path, image: sitk.Image, array: np.ndarray, axis: int, allow_label_maps: bool) -> None:
    """Refuse, with the fix, volumes the model cannot restore meaningfully."""
    in_plane = [n for i, n in enumerate(array.shape) if i != axis]
    if min(in_plane) < MIN_SLICE:
        raise ValueError(f"{path.name}: its slices are {in_plane[1]}x{in_plane[0]} pixels; VLDUN restores slices of "
                         f"at least {MIN_SLICE}x{MIN_SLICE} pixels.")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{path.name} holds NaN or Inf voxels; replace them (e.g. with 0) before restoring.")
        if array.size and float(np.abs(array).max()) > FLOAT32_MAX:
            raise ValueError(f"{path.name} holds values beyond float32's range (|x| > {FLOAT32_MAX:.3g}); rescale "
                             "the volume before restoring.")
    if array.dtype.kind in "iub" and not allow_label_maps:
        values = np.unique(array[:: max(1, array.shape[0] // 64)])
        if len(values) <= LABEL_MAP_VALUES and len(np.unique(array)) <= LABEL_MAP_VALUES:
            raise ValueError(f"{path.name} looks like a label map or mask (integer voxels with only "
                             f"{len(np.unique(array))} distinct values), not a scan; pass --allow-label-maps if it "
                             "really is a scan.")


def predict_volume(
    predictor: VolumePredictor, path: Path, out: Path, batch_size: int = 8, degradation: str | None = None,
    produced_by: dict[str, object] | None = None, allow_label_maps: bool = False, task: str = "auto",
) -> dict[str, object]:
    """Restore and segment one file with a loaded model; returns what `detection.json` holds.

    The old marker goes first and the new one is written last, after both volumes were written and checked,
    so an interrupted or failed case never looks finished."""
    image = read_volume(path)
    suffix = output_suffix(path)
    array = sitk.GetArrayViewFromImage(image)
    axis = slice_axis_of(image)
    check_voxels(path, image, array, axis, allow_label_maps)
    started = time.monotonic()
    prediction = predictor.predict(volume_to_slices(array, axis), batch_size=batch_size,
                                   degradation_override=degradation, task=task)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    _remove_stale_temps(out)
    for name, slices in (("restored", prediction.restored), ("segmentation", prediction.labels)):
        volume = np.ascontiguousarray(slices_to_volume(slices, axis))
        if name == "restored" and not np.isfinite(volume).all():
            raise ValueError(f"{path.name}: the restored volume holds NaN or Inf values; nothing was written.")
        result = sitk.GetImageFromArray(volume)
        result.CopyInformation(image)
        write_volume(result, out / f"{name}{suffix}")
    detection = asdict(prediction.detection)
    detection["seconds"] = round(time.monotonic() - started, 2)
    detection["slice_axis"] = axis
    detection["input"] = str(path.resolve())
    detection["produced_by"] = produced_by
    write_json(detection, out / MARKER)
    return detection


def report(label: str, path: Path, out: Path, detection: dict[str, object]) -> None:
    """The line printed for a finished case; `label` starts it (the cohort's "[3/40] ")."""
    modality = modality_text(detection["modality"], detection["modality_probability"], detection["out_of_distribution"])
    degradation = degradation_text(detection["degradation"], detection["degradation_probability"])
    print(f"{label}{path.name}: {modality}; {degradation}; {len(detection['segments'])} classes; outputs in {out}/")
    if detection["out_of_distribution"]:
        print("Warning: the scan is unlike the training data; check the restored volume with care.")
    if detection.get("segmentation_note"):
        print(f"Note: {detection['segmentation_note']}")


def predict_file(
    path: Path, out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False, allow_label_maps: bool = False, task: str = "auto",
    produced_by: dict[str, object] | None = None,
) -> dict[str, object]:
    """Load the model and restore and segment one file into `out`."""
    if produced_by is None:
        settings = Settings(weights, device, batch_size, degradation, mirror, allow_label_maps, task)
        produced_by = provenance(path, weights_identity(weights), settings)
    predictor = VolumePredictor(weights, device=device, mirror=mirror)
    detection = predict_volume(predictor, path, out, batch_size, degradation, produced_by, allow_label_maps, task)
    report("", path, out, detection)
    return detection


SUMMARY_FIELDS = ("case", "input", "status", "modality", "modality_probability", "degradation",
                  "degradation_probability", "out_of_distribution", "task", "segmentation_note", "seconds", "error")
CASE_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)
"""What one bad case raises (SimpleITK reports an unreadable file as RuntimeError); the cohort goes on."""


def write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    """`summary.csv`, rewritten (atomically) after every case so that an interrupted run keeps what it finished."""
    temp = _temp_beside(path)
    try:
        with temp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, SUMMARY_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


class Case(NamedTuple):
    number: int
    path: Path
    out: Path
    produced_by: dict[str, object] | None = None


class Settings(NamedTuple):
    """What every case of a cohort is run with; it travels to worker processes."""

    weights: str | None
    device: str
    batch_size: int
    degradation: str | None
    mirror: bool
    allow_label_maps: bool = False
    task: str = "auto"


def load_predictor(settings: Settings) -> VolumePredictor:
    return VolumePredictor(settings.weights, device=settings.device, mirror=settings.mirror)


def run_case(predictor: VolumePredictor, case: Case, settings: Settings) -> dict[str, object]:
    """A summary row: the case's detection with status "done", or status "failed" and the error."""
    row: dict[str, object] = {"case": case_name(case.path), "input": str(case.path)}
    try:
        row.update(predict_volume(predictor, case.path, case.out, settings.batch_size, settings.degradation,
                                  case.produced_by, settings.allow_label_maps, settings.task), status="done")
    except CASE_ERRORS as error:
        row.update(status="failed", error=str(error))
    return row


_worker_predictor: VolumePredictor | None = None
"""The model of a worker process, loaded once by `_start_worker`."""


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """End this worker as soon as `parent` is gone (killed with -9, it cannot end its workers itself): a daemon
    thread sees the parent process change (the worker is re-parented) and exits without cleanup. A write in
    progress leaves only a temporary file, and the case no marker."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker(settings: Settings, threads: int, parent: int | None = None) -> None:
    global _worker_predictor
    from .allocator import keep_freed_memory

    _exit_with_parent(parent if parent is not None else os.getppid())
    keep_freed_memory()
    torch.set_num_threads(threads)
    _worker_predictor = load_predictor(settings)


def _worker_case(case: Case, settings: Settings) -> dict[str, object]:
    assert _worker_predictor is not None, "_start_worker runs first in every worker"
    return run_case(_worker_predictor, case, settings)


def run_in_workers(cases: list[Case], settings: Settings, workers: int) -> Iterator[tuple[Case, dict[str, object]]]:
    """(case, row) as each finishes, from `workers` processes that split the CPU threads between them.

    The scan's memory-bound passes keep a second thread of one process only partly busy: on the 2-core
    development CPU, 2 workers of 1 thread each finished 8 volumes of 256x256x50 in 158.9 s against 172.1 s for
    one process with 2 threads (README.md). Each worker holds its own model and volume, so memory grows with them.
    """
    if resolve_device(settings.device).type != "cpu":
        raise ValueError(f"--workers {workers} runs {workers} CPU processes, but the model would run on a GPU; "
                         "a GPU takes one case at a time (--workers 1), or choose --device cpu.")
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, context, _start_worker, (settings, threads, os.getpid())) as pool:
            futures = {pool.submit(_worker_case, case, settings): case for case in cases}
            for future in as_completed(futures):
                yield futures[future], future.result()
    except BrokenProcessPool:
        raise RuntimeError(f"A worker process died (out of memory?); rerun with fewer --workers than {workers}. "
                           "Finished cases are kept and skipped by the rerun.") from None


def predict_cohort(
    inputs: list[Path], out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False, overwrite: bool = False, workers: int = 1,
    allow_label_maps: bool = False, task: str = "auto",
) -> int:
    """Run every case of `inputs` (files or folders) into `out`; returns how many failed.

    A single input file writes into `out` itself, anything else into `out/<case>/` plus `out/summary.csv`
    (in input order). Finished cases are skipped unless `overwrite`; the model loads once per process, and only
    if a case needs it. `workers` above 1 runs the cases in that many CPU processes.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (it is created if missing).")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}.")
    files = find_inputs(inputs)
    single = len(inputs) == 1 and inputs[0].is_file()
    check_no_collision(files, out, single)
    for path in files:
        if path.name.lower().endswith((".nii", ".nii.gz")) and (problem := nifti_size_problem(path)):
            raise ValueError(f"{problem}; nothing was run.")
    settings = Settings(weights, device, batch_size, degradation, mirror, allow_label_maps, task)
    model = weights_identity(weights, task)
    check_writable(out)
    if single:
        produced_by = provenance(files[0], model, settings)
        reason, _ = why_not_finished(out, files[0], produced_by)
        if overwrite or reason is not None:
            if reason:
                print(f"{files[0].name}: redoing it, as {reason}")
            predict_file(files[0], out, **settings._asdict(), produced_by=produced_by)
        else:
            print(f"{files[0].name}: already done in {out}/ (--overwrite redoes it)")
        return 0
    rows: dict[int, dict[str, object]] = {}
    pending: list[Case] = []
    for number, path in enumerate(files, 1):
        case = Case(number, path, out / case_name(path), provenance(path, model, settings))
        reason, done = why_not_finished(case.out, path, case.produced_by)
        if not overwrite and done is not None:
            print(f"{case_label(case, len(files))}{path.name}: already done in {case.out}/ (--overwrite redoes it)")
            rows[number] = {"case": case_name(path), "input": str(path), **done, "status": "skipped"}
        else:
            if reason and not overwrite:
                print(f"{case_label(case, len(files))}{path.name}: redoing it, as {reason}")
            pending.append(case)
    write_summary(out / "summary.csv", [rows[n] for n in sorted(rows)])
    for case, row in run_cases(pending, settings, workers):
        if row["status"] == "done":
            report(case_label(case, len(files)), case.path, case.out, row)
        else:
            print(f"{case_label(case, len(files))}{case.path.name}: failed: {row['error']}", file=sys.stderr)
        rows[case.number] = row
        write_summary(out / "summary.csv", [rows[n] for n in sorted(rows)])
    failed = [str(row["case"]) for _, row in sorted(rows.items()) if row["status"] == "failed"]
    skipped = len(files) - len(pending)
    print(f"{len(rows) - len(failed)} of {len(rows)} cases done"
          + (f" ({skipped} already before this run)" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; summary in {out / 'summary.csv'}")
    return len(failed)


def check_no_collision(files: list[Path], out: Path, single: bool) -> None:
    """Refuse an --out whose outputs would overwrite an input."""
    inputs = {path.resolve(): path for path in files}
    for path in files:
        folder = out if single else out / case_name(path)
        suffix = output_suffix(path)
        outputs = [folder / f"{name}{suffix}" for name in OUTPUT_NAMES] + [folder / MARKER]
        if not single:
            outputs.append(out / "summary.csv")
        for target in outputs:
            if target.resolve() in inputs:
                raise ValueError(f"--out {out} would overwrite the input {inputs[target.resolve()]} with "
                                 f"{target.name}; choose another output folder.")


def check_writable(out: Path) -> None:
    """Create `out` and write a probe file in it now, not after the whole prediction."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".partial-{os.getpid()}-probe"
        probe.write_bytes(b"vldun")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written ({error.strerror or error}); choose a writable folder "
                         "with free space.") from None


def case_label(case: Case, total: int) -> str:
    return f"[{case.number}/{total}] "


def run_cases(cases: list[Case], settings: Settings, workers: int) -> Iterator[tuple[Case, dict[str, object]]]:
    """(case, row) as each finishes: in this process, or in worker processes when `workers` > 1 and it pays."""
    if workers > 1 and len(cases) > 1:
        yield from run_in_workers(cases, settings, min(workers, len(cases)))
        return
    predictor: VolumePredictor | None = None
    for case in cases:
        predictor = predictor or load_predictor(settings)
        yield case, run_case(predictor, case, settings)
