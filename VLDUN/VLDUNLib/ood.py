"""Is a scan like the training data? A Mahalanobis distance of the prior's image embedding.

A softmax probability cannot say "none of these": pure noise or an unseen anatomy still gets one modality
class with high confidence. The distance of the scan's pooled visual embedding (`PriorOutput.embedding`) to
the nearest modality class mean, under a covariance shared by the classes, grows for anything the encoder
did not learn. The means, the precision matrix (inverse shared covariance) and the threshold are calibrated
by the lab on degraded scans of every training dataset (`vldun calibrate-ood`) and stored in the weights'
JSON; a scan farther than the threshold is reported as unlike the training data.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MahalanobisOOD:
    """Per-modality-class means, a shared precision matrix and the distance above which a scan is flagged."""

    means: dict[str, np.ndarray]
    """Modality key -> mean embedding (D,)."""
    precision: np.ndarray
    """(D, D) inverse of the shared (shrunk) covariance."""
    threshold: float

    def __post_init__(self) -> None:
        # Held at float32 precision, as stored, so a model scores the same before and after a save.
        object.__setattr__(self, "means", {k: _float32(v) for k, v in self.means.items()})
        object.__setattr__(self, "precision", _float32(self.precision))
        dims = {m.shape for m in self.means.values()}
        if not self.means or len(dims) != 1 or self.precision.shape != (next(iter(dims))[0],) * 2:
            raise ValueError(f"OOD statistics need class means of one length D and a D x D precision matrix; got "
                             f"means of shapes {sorted(dims)} and a precision of shape {self.precision.shape}")
        if not np.isfinite(self.threshold) or self.threshold <= 0:
            raise ValueError(f"OOD threshold must be a positive distance, got {self.threshold!r}")

    def distances(self, embedding: np.ndarray) -> dict[str, float]:
        """Mahalanobis distance of one embedding (D,) to each class mean."""
        x = np.asarray(embedding, np.float64).reshape(-1)
        return {key: float(np.sqrt(max(0.0, (x - mu) @ self.precision @ (x - mu)))) for key, mu in self.means.items()}

    def score(self, embedding: np.ndarray) -> float:
        """Distance to the nearest class: the scan's unknown-ness (larger is stranger)."""
        return min(self.distances(embedding).values())

    def is_unknown(self, score: float) -> bool:
        return score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "mahalanobis",
            "means": {k: [float(v) for v in mu] for k, mu in self.means.items()},
            "precision_shape": list(self.precision.shape),
            "precision_float32_base64": base64.b64encode(self.precision.astype("<f4").tobytes()).decode("ascii"),
            "threshold": float(self.threshold),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MahalanobisOOD:
        if data.get("method") != "mahalanobis":
            raise ValueError(f"Unknown OOD method {data.get('method')!r}; this VLDUN knows 'mahalanobis'.")
        means = {k: np.asarray(v, np.float64) for k, v in data["means"].items()}
        raw = np.frombuffer(base64.b64decode(data["precision_float32_base64"]), "<f4")
        return cls(means, raw.reshape(data["precision_shape"]), float(data["threshold"]))


def _float32(values: np.ndarray) -> np.ndarray:
    """float64 values rounded to float32 (the stored precision; 16 k numbers of a 128-d embedding stay ~90 kB)."""
    return np.asarray(values, np.float32).astype(np.float64)


def fit_mahalanobis(embeddings: np.ndarray, keys: list[str], shrinkage: float = 0.1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Class means and the precision of the shared within-class covariance, shrunk towards its mean variance.

    Shrinkage keeps the precision finite when there are fewer samples than dimensions (128 for the compact
    prior) and stops directions the training data never varied in from dominating the distance.
    """
    x = np.asarray(embeddings, np.float64)
    if len(x) != len(keys) or len(x) < 2:
        raise ValueError(f"need at least 2 embeddings with one key each, got {len(x)} embeddings and {len(keys)} keys")
    means = {k: x[[i for i, key in enumerate(keys) if key == k]].mean(0) for k in dict.fromkeys(keys)}
    centred = x - np.stack([means[k] for k in keys])
    covariance = centred.T @ centred / max(1, len(x) - len(means))
    target = np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    shrunk = (1 - shrinkage) * covariance + shrinkage * target
    return means, np.linalg.inv(shrunk)
