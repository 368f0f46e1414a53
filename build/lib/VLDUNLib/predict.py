"""`vldun predict`: restore and segment volume files headless, one scan or a whole cohort.

Outputs keep the input's exact geometry (origin, spacing, direction): `restored.<ext>` in the input's
intensity scale, `segmentation.<ext>` (uint8 labels) and `detection.json` with the detected modality
and degradation and the label names. One input file writes them into the output folder itself; several
files, or folders of them, write one subfolder per case and `summary.csv`, with the model loaded once.
`detection.json` is written last and names its input, so it marks a finished case: a rerun skips finished
cases (resuming an interrupted cohort) unless asked to overwrite, and a case that fails is reported and the
others still run. On a CPU, `workers` processes share the cores and take cases in turn (see `predict_cohort`).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
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

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def output_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path.name}: unsupported file type; use one of {', '.join(SUFFIXES)}.")


def read_volume(path: Path) -> sitk.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
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
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIXES))
            if not found:
                raise ValueError(f"{path} holds no volume files ({', '.join(SUFFIXES)}).")
            files.extend(found)
        elif path.is_file():
            output_suffix(path)
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist.")
    seen: dict[str, Path] = {}
    for path in files:
        name = case_name(path)
        if name in seen:
            raise ValueError(f"{seen[name]} and {path} are both case {name!r}, whose outputs would overwrite each "
                             "other; rename one or run them into different output folders.")
        seen[name] = path
    return files


def finished(out: Path, path: Path) -> dict[str, object] | None:
    """The detection of `path` when `out` holds its finished outputs (`detection.json`, written after both
    volumes, names it); else None."""
    try:
        detection = json.loads((out / "detection.json").read_text())
    except (OSError, ValueError):
        return None
    return detection if detection.get("input") == str(path.resolve()) else None


def predict_volume(
    predictor: VolumePredictor, path: Path, out: Path, batch_size: int = 8, degradation: str | None = None,
    task: str = "auto",
) -> dict[str, object]:
    """Restore and segment one file with a loaded model; returns what `detection.json` holds."""
    image = read_volume(path)
    suffix = output_suffix(path)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise ValueError(f"{path.name} holds NaN or Inf voxels; replace them (e.g. with 0) before restoring.")
    axis = slice_axis_of(image)
    started = time.monotonic()
    prediction = predictor.predict(volume_to_slices(array, axis), batch_size=batch_size,
                                   degradation_override=degradation, task=task)
    out.mkdir(parents=True, exist_ok=True)
    for name, slices in (("restored", prediction.restored), ("segmentation", prediction.labels)):
        result = sitk.GetImageFromArray(np.ascontiguousarray(slices_to_volume(slices, axis)))
        result.CopyInformation(image)
        sitk.WriteImage(result, str(out / f"{name}{suffix}"), useCompression=True)
    detection = asdict(prediction.detection)
    detection["seconds"] = round(time.monotonic() - started, 2)
    detection["slice_axis"] = axis
    detection["input"] = str(path.resolve())
    (out / "detection.json").write_text(json.dumps(detection, indent=2) + "\n")
    return detection


def report(label: str, path: Path, out: Path, detection: dict[str, object]) -> None:
    """The line printed for a finished case; `label` starts it (the cohort's "[3/40] ")."""
    print(f"{label}{path.name}: {detection['modality']} (p={detection['modality_probability']:.2f}), "
          f"{detection['degradation']} (p={detection['degradation_probability']:.2f}); "
          f"{len(detection['segments'])} classes; outputs in {out}/")
    if detection["out_of_distribution"]:
        print("Warning: the scan is unlike the training data; check the results with care.")
    if detection.get("segmentation_note"):
        print(f"Note: {detection['segmentation_note']}")


def predict_file(
    path: Path, out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False, task: str = "auto",
) -> dict[str, object]:
    """Load the model and restore and segment one file into `out`."""
    predictor = VolumePredictor(weights, device=device, mirror=mirror)
    detection = predict_volume(predictor, path, out, batch_size, degradation, task)
    report("", path, out, detection)
    return detection


SUMMARY_FIELDS = ("case", "input", "status", "modality", "modality_probability", "degradation",
                  "degradation_probability", "out_of_distribution", "task", "segmentation_note", "seconds", "error")
CASE_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)
"""What one bad case raises (SimpleITK reports an unreadable file as RuntimeError); the cohort goes on."""


def write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    """`summary.csv`, rewritten after every case so that an interrupted run keeps what it finished."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class Case(NamedTuple):
    number: int
    path: Path
    out: Path


class Settings(NamedTuple):
    """What every case of a cohort is run with; it travels to worker processes."""

    weights: str | None
    device: str
    batch_size: int
    degradation: str | None
    mirror: bool
    task: str = "auto"


def load_predictor(settings: Settings) -> VolumePredictor:
    return VolumePredictor(settings.weights, device=settings.device, mirror=settings.mirror)


def run_case(predictor: VolumePredictor, case: Case, settings: Settings) -> dict[str, object]:
    """A summary row: the case's detection with status "done", or status "failed" and the error."""
    row: dict[str, object] = {"case": case_name(case.path), "input": str(case.path)}
    try:
        row.update(predict_volume(predictor, case.path, case.out, settings.batch_size, settings.degradation,
                                  settings.task), status="done")
    except CASE_ERRORS as error:
        row.update(status="failed", error=str(error))
    return row


_worker_predictor: VolumePredictor | None = None
"""The model of a worker process, loaded once by `_start_worker`."""


def _start_worker(settings: Settings, threads: int) -> None:
    global _worker_predictor
    from .allocator import keep_freed_memory

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
        with ProcessPoolExecutor(workers, context, _start_worker, (settings, threads)) as pool:
            futures = {pool.submit(_worker_case, case, settings): case for case in cases}
            for future in as_completed(futures):
                yield futures[future], future.result()
    except BrokenProcessPool:
        raise RuntimeError(f"A worker process died (out of memory?); rerun with fewer --workers than {workers}. "
                           "Finished cases are kept and skipped by the rerun.") from None


def predict_cohort(
    inputs: list[Path], out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False, overwrite: bool = False, workers: int = 1,
    task: str = "auto",
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
    settings = Settings(weights, device, batch_size, degradation, mirror, task)
    if len(inputs) == 1 and inputs[0].is_file():
        if overwrite or finished(out, files[0]) is None:
            predict_file(files[0], out, **settings._asdict())
        else:
            print(f"{files[0].name}: already done in {out}/ (--overwrite redoes it)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, object]] = {}
    pending: list[Case] = []
    for number, path in enumerate(files, 1):
        case = Case(number, path, out / case_name(path))
        if not overwrite and (done := finished(case.out, path)) is not None:
            print(f"{case_label(case, len(files))}{path.name}: already done in {case.out}/ (--overwrite redoes it)")
            rows[number] = {"case": case_name(path), "input": str(path), **done, "status": "skipped"}
        else:
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
