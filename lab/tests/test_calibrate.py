"""`vldun calibrate-ood`: statistics from the training split, threshold from the held-out cases, into the JSON."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import DATA, tiny_predictor
from vldun_lab.calibrate import calibrate, false_alarms, volume_embedding
from vldun_lab.datasets import read_dataset
from vldun_lab.evaluate import Protocol
from vldun_lab.unseen import checkerboard, natural, noise
from VLDUNLib.weights import load_model, save_weights, rewrite_info


@pytest.fixture(scope="module")
def small_sets():
    return [read_dataset(DATA / "Dataset003_COVID19CT"), read_dataset(DATA / "Dataset004_AbdomenCT")]


def test_the_threshold_flags_about_the_quantile_of_held_out_scans(small_sets):
    predictor = tiny_predictor(modalities=("COVID19CT/CT", "AbdomenCT/CT"))
    ood, validation = calibrate(predictor, small_sets, Protocol(size=0), quantile=0.8)
    assert set(ood.means) == {"COVID19CT/CT", "AbdomenCT/CT"} and ood.threshold > 0
    flagged = [ood.is_unknown(ood.score(v)) for v in validation.vectors]
    assert 0 < np.mean(flagged) <= 0.25
    assert sum(e["scans"] for e in false_alarms(ood, validation).values()) == len(validation.vectors)


def test_a_dataset_the_model_was_not_trained_on_is_refused(small_sets):
    with pytest.raises(ValueError, match="not a training dataset"):
        calibrate(tiny_predictor(), small_sets, Protocol(size=0))


def test_the_statistics_are_written_into_the_json_and_the_tensors_stay(small_sets, tmp_path):
    predictor = tiny_predictor(modalities=("COVID19CT/CT", "AbdomenCT/CT"))
    path = tmp_path / "model.safetensors"
    save_weights(predictor.model, predictor.info, path)
    tensors = path.read_bytes()
    predictor.info.ood, _ = calibrate(predictor, small_sets, Protocol(size=0))
    rewrite_info(path, predictor.info)
    _, info = load_model(path)
    assert path.read_bytes() == tensors and info.ood.threshold == predictor.info.ood.threshold
    scan = noise(1)[0][1]
    assert info.ood.score(volume_embedding(predictor, scan)) == pytest.approx(
        predictor.info.ood.score(volume_embedding(predictor, scan)))


def test_unseen_sets_are_volumes_with_contrast():
    for name, volume in natural(slices=2)[:3] + noise(3) + checkerboard():
        assert volume.ndim == 3 and np.ptp(volume) > 0, name
