"""The unknown-scan score: cosine distance of the prior's embedding to the nearest training scan."""

from __future__ import annotations

import numpy as np
import pytest
from VLDUNLib.ood import NearestNeighbourOOD, unit_rows


def test_the_score_is_the_cosine_distance_to_the_nearest_reference_whatever_the_length():
    ood = NearestNeighbourOOD(np.eye(3)[:2], threshold=0.3)
    assert ood.score(np.array([0.0, 5.0, 0.0])) == pytest.approx(0.0)  # a training scan, scaled
    assert ood.score(np.array([0.0, 0.0, 2.0])) == pytest.approx(1.0)  # orthogonal to both
    assert ood.score(np.array([-1.0, -1.0, 0.0])) == pytest.approx(1.0 + np.sqrt(0.5))  # opposite: beyond 1
    assert not ood.is_unknown(ood.score(np.array([1.0, 0.2, 0.0]))) and ood.is_unknown(ood.score(np.ones(3)))


def test_a_scan_near_any_one_training_cluster_passes_though_it_is_far_from_their_mean():
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0, 0, 0]) + rng.normal(0, 0.05, (50, 4))
    b = np.array([0, 1.0, 0, 0]) + rng.normal(0, 0.05, (50, 4))
    ood = NearestNeighbourOOD(unit_rows(np.concatenate([a, b])), threshold=0.05)
    assert not ood.is_unknown(ood.score(np.array([0.02, 1.0, 0.01, 0.0])))
    assert ood.is_unknown(ood.score(np.array([1.0, 1.0, 0.0, 0.0])))  # the mean of the two: no training scan there


def test_references_round_trip_exactly_and_bad_ones_are_refused():
    ood = NearestNeighbourOOD(unit_rows(np.random.default_rng(1).normal(size=(7, 16))), 0.3)
    again = NearestNeighbourOOD.from_dict(ood.to_dict())
    probe = np.random.default_rng(2).normal(size=16)
    assert again.threshold == 0.3 and again.score(probe) == ood.score(probe)
    with pytest.raises(ValueError, match="unit length"):
        NearestNeighbourOOD(np.ones((2, 3)), 0.3)
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbourOOD(np.zeros((0, 3)), 0.3)
    with pytest.raises(ValueError, match="cosine distance"):
        NearestNeighbourOOD(np.eye(3), 0.0)
    with pytest.raises(ValueError, match="length 4"):
        ood.score(np.ones(4))
    with pytest.raises(ValueError, match="calibrate-ood"):
        NearestNeighbourOOD.from_dict({"method": "mahalanobis"})
