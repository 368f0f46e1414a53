"""`vldun predict`: restore and segment a volume file headless, for cohorts run from a shell.

Outputs keep the input's exact geometry (origin, spacing, direction): `restored.<ext>` in the input's
intensity scale, `segmentation.<ext>` (uint8 labels) and `detection.json` with the detected modality
and degradation and the label names.
"""

from __future__ import annotations

import json
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
    image = sitk.ReadImage(str(path))
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


def predict_file(
    path: Path, out: Path, weights: str | None = None, device: str = "auto", batch_size: int = 8,
    degradation: str | None = None, mirror: bool = False,
) -> dict[str, object]:
    image = read_volume(path)
    suffix = output_suffix(path)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise ValueError(f"{path.name} holds NaN or Inf voxels; replace them (e.g. with 0) before restoring.")
    axis = slice_axis_of(image)
    predictor = VolumePredictor(weights, device=device, mirror=mirror)
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
    (out / "detection.json").write_text(json.dumps(detection, indent=2) + "\n")
    det = prediction.detection
    print(f"{path.name}: {det.modality} (p={det.modality_probability:.2f}), {det.degradation} "
          f"(p={det.degradation_probability:.2f}); {len(det.segments)} classes; outputs in {out}/")
    if det.out_of_distribution:
        print("Warning: the scan is unlike the training data (low modality confidence); check the results with care.")
    return detection
