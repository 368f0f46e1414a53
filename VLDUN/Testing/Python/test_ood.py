"""The unknown-scan score: Mahalanobis distance of the prior's embedding to the nearest training modality."""

from __future__ import annotations

import numpy as np
import pytest
from VLDUNLib.ood import MahalanobisOOD, fit_mahalanobis


def clusters(rng: np.random.Generator, n: int = 200) -> tuple[np.ndarray, list[str]]:
    a = rng.normal(0.0, 1.0, (n, 8))
    b = rng.normal(0.0, 1.0, (n, 8)) + 10.0
    return np.concatenate([a, b]), ["A"] * n + ["B"] * n


def test_training_samples_are_near_and_far_points_far():
    rng = np.random.default_rng(0)
    x, keys = clusters(rng)
    means, precision = fit_mahalanobis(x, keys)
    ood = MahalanobisOOD(means, precision, threshold=5.0)
    assert np.allclose(means["B"], 10.0, atol=0.3)
    inside = [ood.score(v) for v in rng.normal(0.0, 1.0, (100, 8))]
    assert np.mean([ood.is_unknown(s) for s in inside]) < 0.05
    assert ood.is_unknown(ood.score(np.full(8, 5.0))) and ood.is_unknown(ood.score(np.full(8, -8.0)))


def test_fewer_samples_than_dimensions_still_give_a_finite_precision():
    rng = np.random.default_rng(1)
    means, precision = fit_mahalanobis(rng.normal(size=(6, 32)), ["A", "B"] * 3)
    assert np.isfinite(precision).all() and np.linalg.eigvalsh(precision).min() > 0


def test_statistics_round_trip_and_bad_ones_are_refused():
    ood = MahalanobisOOD({"A": np.zeros(3)}, np.eye(3), 2.0)
    again = MahalanobisOOD.from_dict(ood.to_dict())
    assert again.threshold == 2.0 and again.score(np.array([0.0, 3.0, 4.0])) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="precision"):
        MahalanobisOOD({"A": np.zeros(3)}, np.eye(2), 2.0)
    with pytest.raises(ValueError, match="positive"):
        MahalanobisOOD({"A": np.zeros(3)}, np.eye(3), 0.0)
