"""Is a scan like the training data? The cosine distance of the prior's image embedding to the nearest training scan.

A softmax probability cannot say "none of these": pure noise or an unseen anatomy still gets one modality
class with high confidence. The scan's pooled visual embedding (`PriorOutput.embedding`) is compared instead with
the embeddings of the training scans, each training case clean and degraded (`vldun calibrate-ood` in the lab):
the score is the cosine distance to the nearest of them (a deep nearest-neighbour score, Sun et al., ICML 2022).
It assumes no shape for the classes. A distance to class means under one shared covariance (the earlier score)
flagged about as many unseen scans at a 95 % quantile threshold, but fell apart when the threshold was raised to
keep held-out false alarms under 5 % (brain atlases 6/8 -> 4/8, tissue maps 4/6 -> 1/6); this score kept them.
The stored threshold is calibrated on held-out cases of every training dataset; a scan farther than it from
every training scan is reported as unlike the training data.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "nearest_neighbour"


@dataclass(frozen=True)
class NearestNeighbourOOD:
    """Unit embeddings of the training scans and the cosine distance above which a scan is flagged."""

    references: np.ndarray
    """(N, D) unit-length embeddings of the training scans (`unit_rows`), held at float32 precision."""
    threshold: float
    """Cosine distance (0 to 2) to the nearest reference above which a scan is unknown."""

    def __post_init__(self) -> None:
        # Held at float32 precision, as stored, so a model scores the same before and after a save.
        references = np.asarray(self.references, np.float32).astype(np.float64)
        object.__setattr__(self, "references", references)
        if references.ndim != 2 or not len(references) or not np.isfinite(references).all():
            raise ValueError(f"OOD references must be a non-empty (N, D) array of finite embeddings; got shape "
                             f"{references.shape}")
        if not np.allclose(np.linalg.norm(references, axis=1), 1.0, atol=1e-4):
            raise ValueError("OOD references must have unit length; build them with ood.unit_rows")
        if not np.isfinite(self.threshold) or not 0 < self.threshold <= 2:
            raise ValueError(f"OOD threshold must be a cosine distance in (0, 2], got {self.threshold!r}")

    def score(self, embedding: np.ndarray) -> float:
        """Cosine distance of one embedding (D,) to the nearest training scan: its unknown-ness (larger is stranger)."""
        x = unit_rows(np.asarray(embedding, np.float64).reshape(1, -1))[0]
        if x.shape != self.references.shape[1:]:
            raise ValueError(f"embedding of length {x.size} against references of length {self.references.shape[1]}")
        return float(1.0 - (self.references @ x).max())

    def is_unknown(self, score: float) -> bool:
        return score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "references_shape": list(self.references.shape),
            "references_float32_base64": base64.b64encode(self.references.astype("<f4").tobytes()).decode("ascii"),
            "threshold": float(self.threshold),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NearestNeighbourOOD:
        if data.get("method") != METHOD:
            raise ValueError(f"Unknown OOD method {data.get('method')!r}; this VLDUN knows {METHOD!r}. Recalibrate the "
                             f"model with `vldun calibrate-ood --weights WEIGHTS --write`.")
        raw = np.frombuffer(base64.b64decode(data["references_float32_base64"]), "<f4")
        return cls(raw.reshape(data["references_shape"]), float(data["threshold"]))


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (rows of zeros stay zero: they match nothing)."""
    x = np.asarray(embeddings, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
