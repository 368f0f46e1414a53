"""One intensity normalisation for training, evaluation and a user's volume in Slicer.

The modality is unknown before the network runs, so the window is chosen from the intensities alone:

- ``"ct_hu"``: the volume looks like CT in Hounsfield units (1st percentile below -500 HU, i.e. a good part
  of the field of view is air, and maximum above 100 HU, i.e. there is contrast or bone). It assumes the
  rescale slope/intercept were applied (SimpleITK and Slicer do this when reading DICOM). The window is
  the fixed [-1000, 1000] HU: from air to dense bone it holds every soft-tissue contrast, and a fixed window
  puts every CT on the same scale, so 0 always means air and 0.525 always means water.
- ``"percentile"``: everything else (MRI of any scale, z-scored MRI, 8-bit windowed CT screenshots,
  [0, 1]-scaled data, CT cropped to the body). MR intensities have no absolute meaning, so the robust
  0.5th and 99.5th percentiles of the finite voxels become 0 and 1; a few bright outliers (vessels,
  fat, artefacts) cannot compress the anatomy. If 99 % of the voxels share one value (a mostly empty
  volume) the finite minimum and maximum are used instead.

``normalize`` is the linear map low -> 0, high -> 1 without clipping, so ``denormalize`` restores the input
scale exactly (a restored volume goes back to the user in its own units). Metrics and the network input use
``to_unit_range`` (clipped to [0, 1]): the degradation model, the PSNR/SSIM data range of 1 and the
network's training data all assume [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch

WindowKind = Literal["ct_hu", "percentile"]
Array = TypeVar("Array", np.ndarray, torch.Tensor)

CT_WINDOW_HU = (-1000.0, 1000.0)
CT_AIR_PERCENTILE = 1.0
CT_AIR_BELOW_HU = -500.0
CT_MAX_ABOVE_HU = 100.0
PERCENTILES = (0.5, 99.5)
MAX_SAMPLES = 1_000_000
"""Voxels drawn to fit a window: percentiles of 1 M voxels are stable to far below one grey level."""
SAMPLE_SEED = 0


@dataclass(frozen=True)
class IntensityWindow:
    """Intensities ``low`` and ``high`` of the input scale that map to 0 and 1."""

    kind: WindowKind
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.kind not in ("ct_hu", "percentile"):
            raise ValueError(f"kind must be 'ct_hu' or 'percentile', got {self.kind!r}")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(
                f"An intensity window needs finite low < high, got low={self.low!r}, high={self.high!r}; "
                "fit one with fit_window(volume)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityWindow:
        if set(data) != {"kind", "low", "high"}:
            raise ValueError(f"An intensity window needs exactly the keys kind, low, high; got {sorted(data)}")
        return cls(data["kind"], float(data["low"]), float(data["high"]))


def _sample(volume: np.ndarray) -> np.ndarray:
    """A fixed-seed random subset of the voxels, so big volumes fit fast and always to the same window."""
    flat = volume.reshape(-1)
    if flat.size <= MAX_SAMPLES:
        return flat
    indices = np.random.default_rng(SAMPLE_SEED).integers(0, flat.size, MAX_SAMPLES)
    return flat[indices]


def _real_array(x: np.ndarray, name: str) -> np.ndarray:
    """Intensities must be real numbers: booleans are masks and complex values are raw k-space."""
    array = np.asarray(x)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    return array


def _finite_sample(volume: np.ndarray) -> np.ndarray:
    """Sampled voxels as float64 with NaN/Inf removed (they carry no intensity)."""
    array = _real_array(volume, "volume")
    sample = _sample(array).astype(np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise ValueError("volume has no finite voxels (empty, or all NaN/Inf); check that the right file was loaded")
    return finite


def _looks_like_hu(finite: np.ndarray) -> bool:
    """Air below -500 HU in at least 1 % of the voxels plus something denser than soft tissue."""
    return np.percentile(finite, CT_AIR_PERCENTILE) < CT_AIR_BELOW_HU and finite.max() > CT_MAX_ABOVE_HU


def fit_window(volume: np.ndarray) -> IntensityWindow:
    """The window of a whole volume (see the module docstring for the two cases).

    Fitted once per volume, never per slice, so all slices of a volume share one scale.
    """
    finite = _finite_sample(volume)
    if _looks_like_hu(finite):
        return IntensityWindow("ct_hu", *CT_WINDOW_HU)
    low, high = np.percentile(finite, PERCENTILES)
    if high <= low:
        low, high = finite.min(), finite.max()
    if high <= low:
        raise ValueError(
            f"volume is constant (every finite voxel is {low:g}), so it has no contrast to normalise; "
            "check that the right file or channel was loaded"
        )
    return IntensityWindow("percentile", float(low), float(high))


def _check_window(window: IntensityWindow) -> None:
    if not isinstance(window, IntensityWindow):
        raise ValueError(f"window must be an IntensityWindow (from fit_window), got {type(window).__name__}")


def _as_float32(x: Array) -> Array:
    """float32 version of a real numpy array or tensor; the callers only use out-of-place arithmetic."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"x must be a real numeric tensor, got dtype {x.dtype}")
        return x.to(torch.float32)
    return _real_array(x, "x").astype(np.float32, copy=False)


def normalize(x: Array, window: IntensityWindow) -> Array:
    """Linear map ``window.low`` -> 0, ``window.high`` -> 1 as float32, without clipping.

    The offset is subtracted before scaling so narrow windows far from 0 keep their precision.
    """
    _check_window(window)
    return (_as_float32(x) - window.low) / (window.high - window.low)


def denormalize(x01: Array, window: IntensityWindow) -> Array:
    """Inverse of ``normalize``: back to the input's intensity scale, as float32.

    Exact up to float32 rounding, about 6e-8 * max(|low|, |high|) in the input's units.
    """
    _check_window(window)
    return _as_float32(x01) * (window.high - window.low) + window.low


def to_unit_range(x: Array) -> Array:
    """Clip normalised intensities to [0, 1] as float32: what the network and the metrics see.

    Values outside the window (metal above 1000 HU, the 0.5 % percentile outliers) saturate.
    """
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32).clamp(0.0, 1.0)
    return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)


def restore_outside_window(original: np.ndarray, unit_input: np.ndarray, unit_restored: np.ndarray,
                           window: IntensityWindow) -> np.ndarray:
    """The network's restoration in the input's scale, losing nothing the window clipped.

    The network sees ``to_unit_range(normalize(original))`` and returns a restored image in [0, 1] terms. Its
    correction (restored - input, in window units) is added to the original voxels inside the window; voxels the
    window clipped (air under -1000 HU, metal above 1000 HU, the MRI maximum above the 99.5th percentile) keep
    their own value, since the network never saw them. A correction of exactly 0 returns ``original`` as float32.
    """
    _check_window(window)
    original32 = _as_float32(np.asarray(original))
    unit = normalize(original32, window)
    inside = (unit >= 0.0) & (unit <= 1.0)
    correction = (np.asarray(unit_restored, np.float32) - np.asarray(unit_input, np.float32)) * np.float32(
        window.high - window.low)
    return np.where(inside, original32 + correction, original32).astype(np.float32, copy=False)
