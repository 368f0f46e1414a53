"""`vldun evaluate`: report shape, fixed seeds, baseline rows, ablation checks, on real data (small)."""

from __future__ import annotations

import csv
import json

import pytest
from model_factory import DATA, tiny_predictor
from vldun_lab.datasets import read_dataset
from vldun_lab.evaluate import (
    Protocol,
    check_ablation,
    confusion,
    confusion_cell,
    write_report,
)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    datasets = [read_dataset(DATA / "Dataset001_ACDC"), read_dataset(DATA / "Dataset003_COVID19CT")]
    predictor = tiny_predictor(modalities=("ACDC/MRI", "BraTS2015/T1c"))
    return out, write_report(predictor, datasets, Protocol(size=48), out, max_cases=1, weights_name="tiny")


def test_metrics_json_has_the_documented_shape(report):
    out, result = report
    saved = json.loads((out / "metrics.json").read_text())
    acdc = saved["datasets"]["Dataset001_ACDC"]
    assert acdc["cases"] == 1
    assert set(acdc["input"]) == {"psnr", "ssim"}
    assert {"psnr", "ssim", "dice", "dice_mean", "iou_mean"} <= set(acdc["model"])
    assert set(acdc["model"]["dice"]) == {"RV", "MYO", "LV"}
    assert 0 <= acdc["modality_accuracy"] <= 1 and 0 <= acdc["degradation_accuracy"] <= 1
    assert "Cartesian undersampling, acceleration 4" in saved["protocol"]


def test_degradation_confusion_counts_every_trial_and_agrees_with_the_accuracy(report):
    """Five known-label trials a case: the four primitives and the dataset's own protocol (MRI or CT)."""
    _, result = report
    for name, protocol in (("Dataset001_ACDC", "undersampling"), ("Dataset003_COVID19CT", "sparse_view")):
        entry = result["datasets"][name]
        table = entry["degradation_confusion"]
        assert set(table) == {"noise", "blur", "motion", "low_resolution", protocol}
        assert sum(sum(seen.values()) for seen in table.values()) == 5
        right = sum(seen.get(truth, 0) for truth, seen in table.items())
        assert entry["degradation_accuracy"] == pytest.approx(right / 5)


def test_confusion_cell_names_the_most_frequent_mistake():
    table = confusion([("blur", "blur")] * 4 + [("blur", "low_resolution")] * 5 + [("blur", "noise")] + [("noise", "noise")])
    assert table == {"noise": {"noise": 1}, "blur": {"blur": 4, "low_resolution": 5, "noise": 1}}
    assert confusion_cell(table["blur"], "blur") == "4/10 (5 low_resolution)"
    assert confusion_cell(table["noise"], "noise") == "1/1"
    assert confusion_cell({}, "motion") == "-"


def test_dataset_unknown_to_the_model_reports_ood_instead_of_accuracy(report):
    _, result = report
    covid = result["datasets"]["Dataset003_COVID19CT"]
    assert covid["modality_accuracy"] is None
    assert 0 <= covid["ood_fraction"] <= 1
    assert "dice" not in covid["model"]


def test_table_and_montages_are_written(report):
    out, _ = report
    table = (out / "table.md").read_text()
    assert "| Degraded input |" in table and "Dataset001_ACDC PSNR" in table
    assert "Degradation prior, right / trials" in table and "| Dataset003_COVID19CT |" in table
    assert (out / "montages" / "Dataset001_ACDC.png").stat().st_size > 1000


def test_cases_csv_lists_each_case_with_its_own_figures(report):
    """One case per dataset here, so each row must equal its dataset's means."""
    out, result = report
    with (out / "cases.csv").open(newline="") as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"Dataset001_ACDC", "Dataset003_COVID19CT"}
    acdc, covid = rows["Dataset001_ACDC"], rows["Dataset003_COVID19CT"]
    means = result["datasets"]["Dataset001_ACDC"]
    assert float(acdc["input_psnr"]) == pytest.approx(means["input"]["psnr"], abs=1e-4)
    assert float(acdc["dice_mean"]) == pytest.approx(means["model"]["dice_mean"], abs=1e-4)
    assert float(acdc["dice_LV"]) == pytest.approx(means["model"]["dice"]["LV"], abs=1e-4)
    assert acdc["truth"] == "ACDC/MRI" and acdc["detected_modality"] in ("ACDC/MRI", "BraTS2015/T1c")
    assert covid["dice_mean"] == "" and covid["dice_LV"] == "" and covid["case"]


def test_two_runs_print_the_same_numbers(report, tmp_path):
    _, first = report
    second = write_report(tiny_predictor(modalities=("ACDC/MRI", "BraTS2015/T1c")), [read_dataset(DATA / "Dataset001_ACDC")], Protocol(size=48), tmp_path,
                          max_cases=1, weights_name="tiny")
    assert second["datasets"]["Dataset001_ACDC"] == first["datasets"]["Dataset001_ACDC"]


def test_ablation_mismatch_is_refused():
    check_ablation(tiny_predictor(ablation="no_fd"), "no_fd")
    with pytest.raises(ValueError, match="not the 'no_fd' ablation"):
        check_ablation(tiny_predictor(), "no_fd")


def test_baseline_is_reported_beside_the_model_with_the_difference(tmp_path):
    datasets = [read_dataset(DATA / "Dataset001_ACDC")]
    baseline = tiny_predictor(architecture="unet")
    result = write_report(tiny_predictor(), datasets, Protocol(size=48), tmp_path, max_cases=1, weights_name="tiny",
                          baseline=baseline)
    entry = result["datasets"]["Dataset001_ACDC"]
    assert {"psnr", "ssim", "dice_mean"} <= set(entry["baseline"])
    table = (tmp_path / "table.md").read_text()
    assert "| baseline |" in table and "PSNR model - baseline" in table


def test_model_without_prior_has_no_modality_figures(tmp_path):
    result = write_report(tiny_predictor(architecture="unet"), [read_dataset(DATA / "Dataset001_ACDC")],
                          Protocol(size=48), tmp_path, max_cases=1, weights_name="unet")
    entry = result["datasets"]["Dataset001_ACDC"]
    assert entry["modality_accuracy"] is None and entry["ood_fraction"] is None and entry["degradation_accuracy"] is None
    assert entry["degradation_confusion"] is None and "Degradation prior" not in (tmp_path / "table.md").read_text()


def test_native_protocol_keeps_the_scan_resolution_and_segments_at_the_training_scale():
    from vldun_lab.datasets import load_case
    from vldun_lab.evaluate import Evaluator

    dataset = read_dataset(DATA / "Dataset001_ACDC")
    case = dataset.cases[0]
    image, label = load_case(case, 0)
    predictor = tiny_predictor()
    evaluator = Evaluator(predictor, Protocol(size=0))
    predictor.info.train_size = None
    at_native = evaluator.run_case(dataset, case, 0)
    predictor.info.train_size = 48
    at_training_scale = evaluator.run_case(dataset, case, 0)
    assert at_native["clean"].shape[-2:] == image.shape[-2:] and at_native["labels"].shape == label.shape
    assert (at_native["labels"] != at_training_scale["labels"]).any()
    assert at_native["input"] == at_training_scale["input"]
    assert "own resolution" in Protocol(size=0).describe()


def test_negative_size_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="0 for each scan's own resolution"):
        Protocol(size=-1)


def test_a_mirrored_report_says_so(tmp_path):
    predictor = tiny_predictor()
    predictor.mirror = True
    result = write_report(predictor, [read_dataset(DATA / "Dataset001_ACDC")], Protocol(size=48), tmp_path,
                          max_cases=1, weights_name="tiny")
    assert result["mirror"] is True and "mirror images" in (tmp_path / "table.md").read_text()


def test_every_case_the_weights_did_not_train_on_is_evaluated():
    """An external cohort named like a training dataset is evaluated whole; only recorded training cases drop."""
    from vldun_lab.evaluate import unseen_cases

    acdc = read_dataset(DATA / "Dataset001_ACDC")
    cases, excluded = unseen_cases(acdc, [])
    assert excluded == 0 and [c.case_id for c in cases] == [c.case_id for c in acdc.cases]
    trained = [c.case_id for c in acdc.cases[:150]]
    cases, excluded = unseen_cases(acdc, trained)
    assert excluded == 150 and [c.case_id for c in cases] == [c.case_id for c in acdc.cases[150:]]


def test_a_case_trained_on_in_part_contributes_its_other_slices():
    from vldun_lab.evaluate import unseen_cases

    abdomen = read_dataset(DATA / "Dataset004_AbdomenCT")
    (case,) = abdomen.cases
    cases, excluded = unseen_cases(abdomen, [f"{case.case_id}[0:21]", f"{case.case_id}[27:30]"])
    assert excluded == 1 and [(c.start, c.stop) for c in cases] == [(21, 27)]


def test_the_report_says_how_many_cases_were_excluded_and_why(report):
    for entry in report[1]["datasets"].values():
        assert entry["excluded"] == {"cases": 0, "why": "trained on by these weights"}


def test_the_report_measures_restoring_clean_slices(report):
    _, result = report
    clean = result["datasets"]["Dataset001_ACDC"]["clean_restored"]
    assert set(clean) == {"psnr", "ssim"} and clean["psnr"] > 0


def test_a_model_with_the_none_class_is_also_tried_on_clean_slices(tmp_path):
    from VLDUNLib.config import NO_DEGRADATION
    from VLDUNLib.degradations import DEGRADATIONS

    predictor = tiny_predictor(degradations=(*DEGRADATIONS, NO_DEGRADATION))
    result = write_report(predictor, [read_dataset(DATA / "Dataset001_ACDC")], Protocol(size=48), tmp_path,
                          max_cases=1, weights_name="tiny")
    table = result["datasets"]["Dataset001_ACDC"]["degradation_confusion"]
    assert sum(table[NO_DEGRADATION].values()) == 1 and sum(sum(s.values()) for s in table.values()) == 6


def test_a_dataset_labelled_with_whole_tumour_alone_averages_it():
    from vldun_lab.evaluate import mean_classes

    assert mean_classes({"whole_tumor": 0.6}) == ["whole_tumor"]
    assert mean_classes({"edema": 0.5, "enhancing": 0.2, "whole_tumor": 0.6}) == ["edema", "enhancing"]


def test_tumour_on_tumour_free_slices_counts_only_slices_with_tissue_and_no_reference_tumour():
    import numpy as np
    import torch
    from vldun_lab.evaluate import tumour_free_slices

    ref = np.zeros((4, 8, 8), np.uint8)
    ref[0, 2:4, 2:4] = 1  # slice 0 has tumour: not counted
    pred = np.zeros_like(ref)
    pred[0, :, :] = 2
    pred[1, 0, :3] = 4  # 3 voxels of tumour on a tumour-free slice
    clean = torch.ones(4, 1, 8, 8)
    clean[3] = 0  # slice 3 is empty (outside the head): not counted
    found = tumour_free_slices(pred, ref, clean, voxel_ml=0.5)
    assert found == {"slices": 2, "with_tumour": 0.5, "tumour_ml": 1.5}


def test_a_voxel_keeps_its_volume_in_ml_after_the_protocol_resizes_the_slices():
    from vldun_lab.datasets import voxel_volume_ml
    from vldun_lab.evaluate import scaled_voxel_ml

    case = read_dataset(DATA / "Dataset007_BraTS2018").cases[0]
    native = voxel_volume_ml(case)
    assert native == pytest.approx(0.001)  # BraTS: 1 mm isotropic
    assert scaled_voxel_ml(case, (240, 240), (48, 48)) == pytest.approx(0.025)


def test_the_table_reports_detection_clean_restoration_and_tumour_free_slices(report):
    out, _ = report
    table = (out / "table.md").read_text()
    assert "Detection and specificity" in table and "clean slice restored PSNR" in table


def test_modality_accuracy_counts_what_a_person_reads_and_the_key_accuracy_the_dataset():
    from vldun_lab.evaluate import aggregate, summarise_case
    from VLDUNLib.results import Detection

    def row(detected_key: str, detected_name: str) -> dict:
        detection = Detection(detected_name, 0.9, {}, "noise", 0.9, {}, False, [], detected_key)
        result = {"detection": detection, "input": {"psnr": 1.0, "ssim": 0.5}, "truth": "BraTS2018/FLAIR",
                  "truth_name": "MRI · brain, FLAIR", "degradation_trials": []}
        return summarise_case(result, {})

    rows = [row("BraTS2015/FLAIR", "MRI · brain, FLAIR"), row("BraTS2018/T1", "MRI · brain, T1")]
    out = aggregate(rows, 2, ("BraTS2015/FLAIR", "BraTS2018/FLAIR", "BraTS2018/T1"), has_prior=True)
    assert out["modality_accuracy"] == 0.5 and out["modality_key_accuracy"] == 0.0


def test_a_resized_report_says_its_detection_figures_are_not_the_slicer_path(report):
    from vldun_lab.evaluate import trust_table

    _, result = report
    assert "use --size 0" in trust_table(result, native=False) and "use --size 0" not in trust_table(result)


def test_threads_set_torch_for_the_lab_commands_and_nonsense_is_refused(monkeypatch):
    import argparse

    import torch
    from vldun_lab import cli

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    cli._set_threads(argparse.Namespace(threads=1))
    cli._set_threads(argparse.Namespace(threads=None))
    assert seen == [1]
    with pytest.raises(ValueError, match="at least 1"):
        cli._set_threads(argparse.Namespace(threads=0))
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for command in ("evaluate", "calibrate-ood"):
        assert parser.parse_args([command, "--data", "x", "--out", "y", "--threads", "1"] if command == "evaluate"
                                 else [command, "--data", "x", "--threads", "1"]).threads == 1
