"""`vldun predict`: restore and segment volume files headless, one scan or a whole cohort.

Outputs keep the input's exact geometry (origin, spacing, direction): `restored.<ext>` in the input's
intensity scale, `segmentation.<ext>` (uint8 labels) and `detection.json` with the detected modality
and degradation and the label names. One input file writes them into the output folder itself; several
files, or folders of them, write one subfolder per case and `summary.csv`, with the model loaded once.
`detection.json` is written last and names its input, so it marks a finished case: a rerun skips finished
cases (resuming an interrupted cohort) unless asked to overwrite, and a case that fails is reported and the
others still run.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import slices_to_volume, through_plane_axis, volume_to_slices
from .inference import VolumePredictor

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
    label: str = "",
) -> dict[str, object]:
    """Restore and segment one file with a loaded model; returns what `detection.json` holds.

    `label` starts the line printed for the case (the cohort's "[3/40] ").
    """
    image = read_volume(path)
    suffix = output_suffix(path)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise ValueError(f"{path.name} holds NaN or Inf voxels; replace them (e.g. with 0) before restoring.")
    axis = slice_axis_of(image)
    started = time.monotonic()
    prediction = predictor.predict(volume_to_slices(array, axis), batch_size=batch_size,
                                   degradation_override=degradation)
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
    det = prediction.detection
    print(f"{label}{path.name}: {det.modality} (p={det.modality_probability:.2f}), {det.degradation} "
          f"(p={det.degradation_probability:.2f}); {len(det.segments)} classes; outputs in {out}/")
    if det.out_of_distribution:
        print("Warning: the scan is unlike the training data (low modality confidence); check the results with care.")
    return detection


def predict_file(
    path: Path, out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False,
) -> dict[str, object]:
    """Load the model and restore and segment one file into `out`."""
    predictor = VolumePredictor(weights, device=device, mirror=mirror)
    return predict_volume(predictor, path, out, batch_size, degradation)


SUMMARY_FIELDS = ("case", "input", "status", "modality", "modality_probability", "degradation",
                  "degradation_probability", "out_of_distribution", "seconds", "error")
CASE_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)
"""What one bad case raises (SimpleITK reports an unreadable file as RuntimeError); the cohort goes on."""


def write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    """`summary.csv`, rewritten after every case so that an interrupted run keeps what it finished."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def predict_cohort(
    inputs: list[Path], out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False, overwrite: bool = False,
) -> int:
    """Run every case of `inputs` (files or folders) into `out`; returns how many failed.

    A single input file writes into `out` itself, anything else into `out/<case>/` plus `out/summary.csv`.
    Finished cases are skipped unless `overwrite`; the model loads once, and only if a case needs it.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (it is created if missing).")
    files = find_inputs(inputs)
    single = len(inputs) == 1 and inputs[0].is_file()
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    predictor: VolumePredictor | None = None
    rows: list[dict[str, object]] = []
    for number, path in enumerate(files, 1):
        target, label = (out, "") if single else (out / case_name(path), f"[{number}/{len(files)}] ")
        row: dict[str, object] = {"case": case_name(path), "input": str(path)}
        if not overwrite and (done := finished(target, path)) is not None:
            print(f"{label}{path.name}: already done in {target}/ (--overwrite redoes it)")
            row.update(done, status="skipped")
        else:
            predictor = predictor or VolumePredictor(weights, device=device, mirror=mirror)
            try:
                row.update(predict_volume(predictor, path, target, batch_size, degradation, label), status="done")
            except CASE_ERRORS as error:
                if single:
                    raise
                print(f"{label}{path.name}: failed: {error}", file=sys.stderr)
                row.update(status="failed", error=str(error))
        rows.append(row)
        if not single:
            write_summary(out / "summary.csv", rows)
    failed = [str(row["case"]) for row in rows if row["status"] == "failed"]
    skipped = sum(row["status"] == "skipped" for row in rows)
    if not single:
        print(f"{len(rows) - len(failed)} of {len(rows)} cases done"
              + (f" ({skipped} already before this run)" if skipped else "")
              + (f"; failed: {', '.join(failed)}" if failed else "") + f"; summary in {out / 'summary.csv'}")
    return len(failed)
