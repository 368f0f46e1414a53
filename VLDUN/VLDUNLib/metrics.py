"""Restoration (PSNR, SSIM) and segmentation (Dice, IoU) metrics of the paper's Tables 1-3.

PSNR and SSIM take images in [0, 1] (``intensity.to_unit_range``) with ``data_range=1``. Both run in torch,
on a single image (H, W), numpy or torch, which gives a Python float, or on a batch (B, 1, H, W), which gives
one value per image in the input's type (numpy (B,) or a tensor (B,) on the input's device). Numpy inputs
are computed in float64, tensors in their own float precision (at least float32). SSIM is the Gaussian SSIM
of Wang et al. (2004) exactly as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)`` computes it.

Dice and IoU follow one convention everywhere: a class absent from both prediction and reference has no
score (``None``) and is left out of every mean, rather than counted as a perfect 1.0 that would reward
predicting nothing; a class predicted where the reference has none scores 0. Per-dataset scores are
computed per case over the whole volume (3-D Dice: counts accumulated over all slices of a case with
``CaseOverlap``), averaged over the dataset's foreground classes, then averaged over cases. Slice-wise
Dice would let the many empty slices dominate and a per-dataset voxel pool would let big cases dominate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
"""11: scipy's Gaussian filter with sigma 1.5, truncated at 3.5 sigma, as scikit-image uses."""

ImageLike = Union[np.ndarray, torch.Tensor]
Score = Union[float, np.ndarray, torch.Tensor]


def _as_batch(x: ImageLike, name: str) -> tuple[torch.Tensor, bool]:
    """(B, 1, H, W) float tensor (float64 from numpy, at least float32 from torch) and whether x was 2-D."""
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    single = tensor.ndim == 2
    if single:
        tensor = tensor[None, None]
    elif tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"{name} must have shape (H, W) or (B, 1, H, W), got {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    return tensor, single


def _pair(pred: ImageLike, target: ImageLike) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both images as batches of one common dtype; shapes must agree exactly."""
    p, single = _as_batch(pred, "pred")
    t, _ = _as_batch(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    dtype = torch.promote_types(p.dtype, t.dtype)
    return p.to(dtype), t.to(device=p.device, dtype=dtype), single


def _result(values: torch.Tensor, single: bool, like: ImageLike) -> Score:
    """A float for one image, else per-image values in the framework of the input."""
    if single:
        return float(values[0])
    return values.detach().cpu().numpy() if not isinstance(like, torch.Tensor) else values


def _check_range(data_range: float) -> None:
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}; use 1.0 for [0, 1] images")


def psnr(pred: ImageLike, target: ImageLike, data_range: float = 1.0) -> Score:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); identical images give +inf."""
    _check_range(data_range)
    p, t, single = _pair(pred, target)
    mse = ((p - t) ** 2).mean(dim=(1, 2, 3))
    return _result(10 * torch.log10(data_range**2 / mse), single, pred)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian, sigma 1.5, 11 taps (scipy.ndimage.gaussian_filter's kernel)."""
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter: scikit-image crops the border where its window leaves the image."""
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return F.conv2d(x, kernel.view(1, 1, 1, -1))


def ssim(pred: ImageLike, target: ImageLike, data_range: float = 1.0) -> Score:
    """Mean structural similarity (Wang et al. 2004) with an 11-tap Gaussian window, sigma 1.5."""
    _check_range(data_range)
    p, t, single = _pair(pred, target)
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(p.shape[-2:])}")
    kernel = _gaussian_window(p.dtype, p.device)
    moments = torch.cat([p, t, p * p, t * t, p * t], dim=1)
    filtered = _filter(moments.reshape(-1, 1, *moments.shape[-2:]), kernel)
    stats = filtered.reshape(moments.shape[0], 5, *filtered.shape[-2:])
    mu_p, mu_t, pp, tt, pt = stats.unbind(dim=1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return _result(ssim_map.mean(dim=(1, 2)), single, pred)


def _labels(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass(frozen=True)
class OverlapCounts:
    """Voxel counts of one class: true positives, false positives, false negatives. Add them over slices."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float | None:
        """2 TP / (2 TP + FP + FN); None when the class is in neither prediction nor reference."""
        denominator = 2 * self.tp + self.fp + self.fn
        return None if denominator == 0 else 2 * self.tp / denominator

    @property
    def iou(self) -> float | None:
        """TP / (TP + FP + FN) (Jaccard); None when the class is in neither prediction nor reference."""
        denominator = self.tp + self.fp + self.fn
        return None if denominator == 0 else self.tp / denominator


def confusion_counts(pred_labels: ImageLike, target_labels: ImageLike, label: int) -> OverlapCounts:
    """Counts of class ``label`` in label maps of any (equal) shape: a slice or a whole volume."""
    pred, target = _labels(pred_labels), _labels(target_labels)
    if pred.shape != target.shape:
        raise ValueError(f"label maps must have the same shape, got {pred.shape} and {target.shape}")
    p, t = pred == label, target == label
    return OverlapCounts(int(np.count_nonzero(p & t)), int(np.count_nonzero(p & ~t)), int(np.count_nonzero(~p & t)))


def dice(pred_labels: ImageLike, target_labels: ImageLike, label: int) -> float | None:
    """Dice of class ``label``; None if absent from both maps, 0 if predicted but absent from the reference."""
    return confusion_counts(pred_labels, target_labels, label).dice


def iou(pred_labels: ImageLike, target_labels: ImageLike, label: int) -> float | None:
    """IoU of class ``label``, with the same conventions as ``dice``."""
    return confusion_counts(pred_labels, target_labels, label).iou


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the scores that exist; None when none does (so the caller's mean leaves it out too)."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


class CaseOverlap:
    """Per-class counts of one case, accumulated slice by slice, for the 3-D Dice/IoU of the whole volume."""

    def __init__(self, labels: Sequence[int]) -> None:
        if not labels or 0 in labels:
            raise ValueError(f"labels must list the foreground classes to score (no background 0), got {list(labels)}")
        self.counts = {int(label): OverlapCounts() for label in labels}

    def update(self, pred_labels: ImageLike, target_labels: ImageLike) -> None:
        """Add one slice (or any block of slices) of the case."""
        for label in self.counts:
            self.counts[label] = self.counts[label] + confusion_counts(pred_labels, target_labels, label)

    def dice(self) -> dict[int, float | None]:
        return {label: counts.dice for label, counts in self.counts.items()}

    def iou(self) -> dict[int, float | None]:
        return {label: counts.iou for label, counts in self.counts.items()}

    def mean_dice(self) -> float | None:
        """The case's score: mean Dice over the classes that occur in prediction or reference."""
        return mean_defined(self.dice().values())

    def mean_iou(self) -> float | None:
        return mean_defined(self.iou().values())
