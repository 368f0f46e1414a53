"""`vldun calibrate-ood`: statistics from the training split, threshold from the held-out cases, into the JSON."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import DATA, tiny_predictor
from vldun_lab.calibrate import (
    QUANTILES,
    Embeddings,
    calibrate,
    false_alarms,
    held_out_false_alarms,
    quantile_for,
    split_of,
    volume_embedding,
)
from vldun_lab.datasets import read_dataset
from vldun_lab.evaluate import Protocol
from vldun_lab.unseen import checkerboard, natural, noise
from VLDUNLib.weights import load_model, rewrite_info, save_weights


@pytest.fixture(scope="module")
def small_sets():
    if not DATA.is_dir():
        pytest.skip("needs ../shared/data")
    return [read_dataset(DATA / "Dataset003_COVID19CT"), read_dataset(DATA / "Dataset004_AbdomenCT")]


def test_the_threshold_flags_about_the_quantile_of_held_out_scans(small_sets):
    predictor = tiny_predictor(modalities=("COVID19CT/CT", "AbdomenCT/CT"))
    ood, validation, quantile = calibrate(predictor, small_sets, Protocol(size=0), quantile=0.8)
    training_scans = sum(2 * len(split_of(predictor, d)[0]) * len(d.channels) for d in small_sets)  # clean, degraded
    assert ood.references.shape == (training_scans, predictor.model.prior.token_dim) and ood.threshold > 0
    flagged = [ood.is_unknown(ood.score(v)) for v in validation.vectors]
    assert 0 < np.mean(flagged) <= 0.2  # never more than 1 - quantile
    assert sum(e["scans"] for e in false_alarms(ood, validation).values()) == len(validation.vectors)


def test_a_dataset_the_model_was_not_trained_on_is_refused(small_sets):
    with pytest.raises(ValueError, match="not a training dataset"):
        calibrate(tiny_predictor(), small_sets, Protocol(size=0))


def test_the_statistics_are_written_into_the_json_and_the_tensors_stay(small_sets, tmp_path):
    predictor = tiny_predictor(modalities=("COVID19CT/CT", "AbdomenCT/CT"))
    path = tmp_path / "model.safetensors"
    save_weights(predictor.model, predictor.info, path)
    tensors = path.read_bytes()
    predictor.info.ood, _, quantile = calibrate(predictor, small_sets, Protocol(size=0))
    assert quantile in QUANTILES
    rewrite_info(path, predictor.info)
    _, info = load_model(path)
    assert path.read_bytes() == tensors and info.ood.threshold == predictor.info.ood.threshold
    scan = noise(1)[0][1]
    assert info.ood.score(volume_embedding(predictor, scan)) == pytest.approx(
        predictor.info.ood.score(volume_embedding(predictor, scan)))


def test_unseen_sets_are_volumes_with_contrast():
    for name, volume in natural(slices=2)[:3] + noise(3) + checkerboard():
        assert volume.ndim == 3 and np.ptp(volume) > 0, name


def _write_inv3(path, volume: np.ndarray, spacing) -> None:
    """An InVesalius project as InVesalius writes one: a gzipped tar of a folder with main.plist and the raw matrix."""
    import io
    import plistlib
    import tarfile

    main = {"matrix": {"dtype": str(volume.dtype), "filename": "matrix.dat", "shape": list(volume.shape)},
            "modality": "CT", "spacing": list(spacing)}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("main.plist", plistlib.dumps(main)), ("matrix.dat", volume.tobytes())):
            entry = tarfile.TarInfo(f"tmpabc/{name}")
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))


def test_an_invesalius_project_is_read_with_its_values_and_spacing(tmp_path):
    from vldun_lab.unseen import read_invesalius

    volume = (np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 1024)
    _write_inv3(tmp_path / "head.inv3", volume, (0.5, 0.5, 1.5))
    read, spacing = read_invesalius(tmp_path / "head.inv3")
    assert read.dtype == np.float32 and np.array_equal(read, volume) and spacing == (0.5, 0.5, 1.5)


def test_the_shipped_head_ct_is_read_in_hounsfield_units():
    from vldun_lab.unseen import INVESALIUS_CRANIUM, head_ct

    if not INVESALIUS_CRANIUM.exists():
        pytest.skip("Debian's invesalius-examples is not installed (apt install invesalius-examples)")
    volume = head_ct()
    assert volume.shape == (108, 256, 256) and volume.min() == -1024 and volume.max() > 2000  # air, bone


def test_real_unseen_scans_come_shipped_and_degraded():
    from vldun_lab.unseen import as_shipped_and_degraded

    volume = np.random.default_rng(0).normal(100, 20, (4, 48, 48)).astype(np.float32)
    (_, shipped), (degraded_name, degraded) = as_shipped_and_degraded("scan", volume, "CT")
    assert shipped is volume and degraded_name == "scan (degraded)" and degraded.shape == volume.shape
    from VLDUNLib.intensity import fit_window, normalize, to_unit_range

    unit = to_unit_range(normalize(volume, fit_window(volume)))
    assert np.isfinite(degraded).all() and 0.01 < np.abs(degraded - unit).mean() < 0.5  # degraded, still the scan


def test_tumour_on_a_healthy_brain_is_counted_with_the_task_forced_and_as_auto_routes_it():
    from model_factory import two_task_predictor
    from vldun_lab.unseen import healthy_brain_tumour_ml

    volume = np.random.default_rng(1).normal(100, 20, (6, 40, 40)).astype(np.float32)
    voxel_ml = 0.002
    for threshold in (0.0, 2.0):  # 2.0 flags every scan unknown: auto leaves it unsegmented
        predictor = two_task_predictor(ood_threshold=threshold)
        forced = predictor.predict(volume, task="brain_tumour")
        expected = float(np.isin(forced.labels, [s.label for s in forced.detection.segments]).sum()) * voxel_ml
        found = healthy_brain_tumour_ml(predictor, volume, voxel_ml)
        assert found["tumour_ml"]["brain_tumour"] == pytest.approx(expected) and expected > 0
        routed = predictor.predict(volume).detection.task
        assert found["auto_task"] == routed
        assert found["tumour_ml"]["auto"] == (expected if routed == "brain_tumour" else 0.0)
    assert found["unknown"] and found["auto_task"] is None


class _FirstValue:
    """A stand-in scorer: a scan's score is its embedding's first value."""

    def score(self, vector):
        return float(vector[0])


def test_held_out_false_alarms_judge_each_case_by_the_others_threshold():
    # 20 one-scan cases scoring 1..20: the 95th percentile of all of them is 20, so none lies above it; left out,
    # case 20 meets the others' threshold of 19 and is flagged, while 19 meets 20 and is not
    found = Embeddings([np.array([float(i), 0.0]) for i in range(1, 21)], ["A/x"] * 20,
                       [f"DatasetA/case{i}/x/degraded" for i in range(1, 21)])
    rates = held_out_false_alarms(_FirstValue(), found, 0.95, 1.0)
    assert rates == {"DatasetA": {"flagged": 0.05, "scans": 20}, "all": {"flagged": 0.05, "scans": 20}}


def test_a_case_is_left_out_whole():
    # two versions of one case that alone hold the top scores: judged without them, both are flagged
    vectors = [np.array([float(i), 0.0]) for i in range(1, 19)] + [np.array([50.0, 0]), np.array([60.0, 0])]
    sources = [f"D/c{i}/x/degraded" for i in range(1, 19)] + ["D/top/x/clean", "D/top/x/degraded"]
    rates = held_out_false_alarms(_FirstValue(), Embeddings(vectors, ["D/x"] * 20, sources), 0.95, 1.0)
    assert rates["all"] == {"flagged": 0.1, "scans": 20}


def test_the_quantile_is_the_lowest_whose_held_out_false_alarms_meet_the_target():
    # 100 one-scan cases scoring 1..100: judged by the others, 96-100 are flagged at the 0.95 quantile (5 %),
    # 97-100 at 0.96 (4 %); none is within 0 %, so the highest quantile is taken
    scores, cases = np.arange(1.0, 101.0), np.array([f"D/c{i}" for i in range(100)])
    assert quantile_for(scores, cases, 1.0, 0.05) == 0.95
    assert quantile_for(scores, cases, 1.0, 0.04) == 0.96
    assert quantile_for(scores, cases, 1.0, 0.0) == QUANTILES[-1]
