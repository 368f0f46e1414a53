"""What a VL-DUN run reports, without torch.

The Slicer process holds these while the model runs in a worker process; importing torch there
would freeze Slicer for seconds, so they live apart from `inference`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np


class Cancelled(Exception):
    """The run was cancelled (between batches, or by stopping the worker); nothing was written."""


def modality_text(modality: str, probability: float, unknown: bool) -> str:
    """The detected modality as a person should read it. For a scan unlike the training data the prior's
    probability says nothing (it always picks a training modality), so it is named unknown, with the nearest."""
    if unknown:
        return f"unknown scan, unlike the training data (nearest: {modality})"
    return f"{modality} ({probability:.0%})"


def degradation_text(degradation: str, probability: float) -> str:
    return f"{degradation.replace('_', ' ')} ({probability:.0%})"


@dataclass(frozen=True)
class SegmentClass:
    label: int
    """Value in `Prediction.labels` (1..n)."""
    name: str
    """Human-readable name, e.g. "left ventricle cavity"."""
    key: str
    """Canonical class key of the model, e.g. "ACDC/LV"."""


@dataclass
class Detection:
    modality: str
    """What a person reads, e.g. "MRI · heart, cine" (`ModelInfo.modality_names`)."""
    modality_probability: float
    modality_probabilities: dict[str, float]
    """Modality key -> probability."""
    degradation: str
    """The detected degradation's name, or "no degradation detected" when a model with a "none" class finds none."""
    degradation_probability: float
    degradation_probabilities: dict[str, float]
    out_of_distribution: bool
    """The scan is unlike the training data: its unknown-scan score is above the model's calibrated threshold."""
    segments: list[SegmentClass]
    modality_key: str = ""
    """The model's modality class, e.g. "ACDC/MRI", for machines."""
    ood_score: Optional[float] = None
    """Cosine distance of the scan's embedding to the nearest training scan (`ood.NearestNeighbourOOD.score`); None
    for models without statistics (they compare the modality probability with `ModelInfo.ood_threshold`)."""
    task: Optional[str] = None
    """The task whose classes `segments` lists ("heart", ...); None when the scan was not segmented."""
    segmentation_note: str = ""
    """Why the scan was not segmented and how to segment it anyway; empty when it was."""

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def modality_text(self) -> str:
        """`modality_text`: what the panel and the command line show."""
        return modality_text(self.modality, self.modality_probability, self.out_of_distribution)

    @property
    def degradation_text(self) -> str:
        return degradation_text(self.degradation, self.degradation_probability)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Detection:
        fields = dict(data)
        fields["segments"] = [SegmentClass(**segment) for segment in data["segments"]]
        return cls(**fields)


@dataclass
class Prediction:
    restored: np.ndarray
    """(S, H, W) float32 in the input's intensity scale."""
    labels: np.ndarray
    """(S, H, W) uint8: 0 background, else `SegmentClass.label`."""
    detection: Detection
