"""`vldun predict` on files and cohorts: geometry kept exactly, bad files refused or reported while the rest
of a cohort runs, finished cases skipped on a rerun, the CLI reports errors cleanly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_factory import tiny_predictor
from VLDUNLib.cli import main
from VLDUNLib.predict import find_inputs, predict_cohort, predict_file, slice_axis_of
from VLDUNLib.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    predictor = tiny_predictor()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(predictor.model, predictor.info, path)
    return path


def oblique_image(tmp_path, spacing=(1.0, 1.0, 5.0), name="scan.nrrd", seed=0):
    array = np.random.default_rng(seed).normal(100, 30, (4, 20, 18)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -5.0, 3.0))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path, image


def test_outputs_keep_the_input_geometry(tmp_path, weights):
    path, image = oblique_image(tmp_path)
    before = path.read_bytes()
    detection = predict_file(path, tmp_path / "out", weights=str(weights), device="cpu")
    for name in ("restored", "segmentation"):
        result = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nrrd"))
        assert result.GetSize() == image.GetSize()
        assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
        assert np.allclose(result.GetDirection(), image.GetDirection())
    assert path.read_bytes() == before
    saved = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert saved["modality"] == detection["modality"] and saved["slice_axis"] == 0


def test_thick_axis_is_the_slice_axis(tmp_path):
    _, image = oblique_image(tmp_path, spacing=(4.0, 1.0, 1.0))
    assert slice_axis_of(image) == 2


def test_vector_images_are_refused(tmp_path, weights):
    rgb = sitk.Image([16, 16, 3], sitk.sitkVectorFloat32, 3)
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(rgb, str(path))
    with pytest.raises(ValueError, match="components"):
        predict_file(path, tmp_path / "out", weights=str(weights))


def test_unreadable_files_are_named_with_the_reason(tmp_path, weights):
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="truncated.nii.gz (could not be read .*complete|is truncated or corrupt)"):
        predict_file(path, tmp_path / "out", weights=str(weights))


def test_cli_reports_missing_files_without_a_traceback(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_mirror_flag_reaches_the_predictor(tmp_path, weights, monkeypatch):
    from VLDUNLib import inference

    seen = []
    original = inference.VolumePredictor.segment

    def spy(self, *args, **kwargs):
        seen.append(self.mirror)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(inference.VolumePredictor, "segment", spy)
    path, _ = oblique_image(tmp_path)
    for flags in ([], ["--mirror", "--overwrite"]):
        assert main(["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights),
                     "--device", "cpu", *flags]) == 0
    assert seen and seen[0] is False and seen[-1] is True


def cohort(tmp_path):
    """Two readable scans and one unreadable file in a folder."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    for seed, name in enumerate(("case_a.nii.gz", "case_b.nrrd")):
        oblique_image(folder, name=name, seed=seed)
    (folder / "case_c.mha").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def summary(out):
    with (out / "summary.csv").open(newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_a_cohort_runs_every_case_and_reports_the_bad_one(tmp_path, weights, capsys):
    folder, out = cohort(tmp_path), tmp_path / "out"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", str(folder), "--out", str(out), "--weights", str(weights), "--device", "cpu"]) == 1
    rows = summary(out)
    assert {case: row["status"] for case, row in rows.items()} == {
        "case_a": "done", "case_b": "done", "case_c": "failed"}
    assert "case_c.mha" in capsys.readouterr().err and rows["case_c"]["error"]
    for case, suffix in (("case_a", ".nii.gz"), ("case_b", ".nrrd")):
        assert {p.name for p in (out / case).iterdir()} == {
            f"restored{suffix}", f"segmentation{suffix}", "detection.json"}
        assert rows[case]["modality"] == json.loads((out / case / "detection.json").read_text())["modality"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_rerun_skips_finished_cases_unless_told_to_overwrite(tmp_path, weights, monkeypatch):
    from VLDUNLib import predict

    folder, out = cohort(tmp_path), tmp_path / "out"
    (folder / "case_c.mha").unlink()
    args = ["predict", str(folder), "--out", str(out), "--weights", str(weights), "--device", "cpu"]
    assert main(args) == 0
    stamp = (out / "case_a" / "restored.nii.gz").stat().st_mtime_ns
    runs = []
    fake = {"modality": "x", "modality_probability": 1.0, "degradation": "noise", "degradation_probability": 1.0,
            "segments": [], "out_of_distribution": False}
    monkeypatch.setattr(predict, "predict_volume", lambda *a, **k: runs.append(a[1].name) or fake)
    assert main(args) == 0
    assert runs == [] and {row["status"] for row in summary(out).values()} == {"skipped"}
    assert (out / "case_a" / "restored.nii.gz").stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0
    assert runs == ["case_a.nii.gz", "case_b.nrrd"]


def test_workers_give_the_same_cohort_as_one_process(tmp_path, weights, capsys):
    folder = cohort(tmp_path)
    args = ["predict", str(folder), "--weights", str(weights), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 1
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 1
    one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert list(two) == ["case_a", "case_b", "case_c"]
    assert {c: r["status"] for c, r in two.items()} == {c: r["status"] for c, r in one.items()}
    assert two["case_c"]["error"] == one["case_c"]["error"] and "case_c.mha" in capsys.readouterr().err
    for case, suffix in (("case_a", ".nii.gz"), ("case_b", ".nrrd")):
        for name in ("restored", "segmentation"):
            a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / run / case / f"{name}{suffix}")))
                    for run in ("one", "two"))
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_workers_are_refused_on_a_gpu_and_below_one(tmp_path, weights, monkeypatch):
    from VLDUNLib import predict

    folder = cohort(tmp_path)
    (folder / "case_c.mha").unlink()
    with pytest.raises(ValueError, match="at least 1"):
        predict_cohort([folder], tmp_path / "out", weights=str(weights), workers=0)
    monkeypatch.setattr(predict, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(ValueError, match="--workers 2 runs 2 CPU processes"):
        predict_cohort([folder], tmp_path / "out", weights=str(weights), device="cuda", workers=2)


def test_another_scan_into_the_same_folder_is_not_taken_for_done(tmp_path, weights):
    first, _ = oblique_image(tmp_path, name="first.nrrd")
    second, _ = oblique_image(tmp_path, name="second.nrrd", seed=1)
    for path in (first, second):
        assert main(["predict", str(path), "--out", str(tmp_path / "o"), "--weights", str(weights),
                     "--device", "cpu"]) == 0
        assert json.loads((tmp_path / "o" / "detection.json").read_text())["input"] == str(path.resolve())


def test_inputs_are_checked_before_anything_runs(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        oblique_image(folder, name="case.nrrd")
    with pytest.raises(ValueError, match="both case 'case'"):
        find_inputs([first, second])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no volume files"):
        find_inputs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_inputs([first, tmp_path / "missing.nii.gz"])
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match="is a file; name a folder"):
        predict_cohort([first], tmp_path / "taken")
    oblique_image(first, name="another.nii")
    (first / "notes.txt").write_text("not a volume")
    assert find_inputs([first]) == [first / "another.nii", first / "case.nrrd"]


def test_task_reaches_the_predictor_and_is_written_with_the_note(tmp_path, weights):
    path, _ = oblique_image(tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(path), "--out", str(out), "--weights", str(weights), "--device", "cpu",
                 "--task", "heart"]) == 0
    detection = json.loads((out / "detection.json").read_text())
    assert detection["task"] == "heart" and detection["segmentation_note"] == ""
    assert detection["modality"] == "MRI · heart, cine" and detection["modality_key"] == "ACDC/MRI"
    assert main(["predict", str(path), "--out", str(tmp_path / "bad"), "--weights", str(weights), "--device", "cpu",
                 "--task", "liver"]) == 2


def test_summary_has_the_task_and_note_columns(tmp_path, weights):
    folder, out = cohort(tmp_path), tmp_path / "out"
    main(["predict", str(folder), "--out", str(out), "--weights", str(weights), "--device", "cpu"])
    rows = summary(out)
    assert rows["case_a"]["task"] == "heart" and "segmentation_note" in rows["case_a"]


def test_an_unknown_scan_is_reported_as_unknown_not_as_its_nearest_modality(capsys):
    from VLDUNLib.predict import report
    from VLDUNLib.results import Detection

    detection = Detection("MRI · brain, FLAIR", 0.81, {}, "motion", 0.99, {}, True, [], "BraTS2015/FLAIR", 9.9)
    report("", Path("head_ct.nii.gz"), Path("out"), detection.to_json())
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("head_ct.nii.gz: unknown scan, unlike the training data (nearest: MRI · brain, FLAIR);")
    assert "81 %" not in first and "81%" not in first
    detection.out_of_distribution = False
    assert detection.modality_text == "MRI · brain, FLAIR (81%)" and detection.degradation_text == "motion (99%)"
