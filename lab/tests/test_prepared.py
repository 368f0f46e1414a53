"""`vldun prepare`: a run's slices in one file that round-trips, trains without SimpleITK and refuses misuse."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import data, run_settings, write_config  # noqa: F401 (data: the tiny datasets fixture)
from vldun_lab import prepared
from VLDUNLib.cli import main
from VLDUNLib.weights import load_model


@pytest.fixture(scope="module")
def prepared_file(data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    config = write_config(folder, run_settings(data, folder / "run"))
    out = folder / "slices.vldun"
    assert main(["prepare", str(config), "--out", str(out)]) == 0
    return out


def test_round_trip_keeps_every_slice_label_class_and_split(data: list[Path], prepared_file: Path) -> None:
    settings = run_settings(data, Path("unused"))
    original = prepared.from_folders([str(d) for d in data], settings["patch"], 0.2, settings["seed"])
    loaded = prepared.load(prepared_file)
    assert loaded.modalities == original.modalities and loaded.labels == original.labels
    assert loaded.validation_cases == original.validation_cases
    assert (loaded.patch, loaded.val_fraction, loaded.seed) == (16, 0.2, 3)
    pairs = [(loaded.train, original.train)] + [(loaded.validation[k], v) for k, v in original.validation.items()]
    for mine, theirs in pairs:
        assert mine.augment == theirs.augment and len(mine) == len(theirs) > 0
        assert (mine.images - theirs.images).abs().max() <= 1 / 510 + 1e-7
        for name in ("labels", "sample_dataset", "sample_modality"):
            assert torch.equal(getattr(mine, name), getattr(theirs, name))
    item = loaded.train.item(0, torch.Generator().manual_seed(0))
    assert item["clean"].shape == (1, 16, 16) and item["class_mask"].tolist() == [True, True, True, False]


def test_a_run_from_the_prepared_file_trains_where_simpleitk_is_missing(
    data: list[Path], prepared_file: Path, tmp_path: Path
) -> None:
    settings = {**run_settings(data, tmp_path / "run"), "data": [str(prepared_file)]}
    config = write_config(tmp_path, settings)
    script = ("import sys; sys.modules['SimpleITK'] = None; from pathlib import Path; "
              f"from vldun_lab.train import train_from_file; train_from_file(Path({str(config)!r}))")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    _, info = load_model(tmp_path / "run" / "model.safetensors")
    assert info.classes == ["background", "TinyMRI/cavity", "TinyMRI/wall", "TinyCT/organ"]
    assert info.extra["validation_cases"] == prepared.load(prepared_file).validation_cases
    assert info.extra["datasets"] == ["Dataset801_TinyMRI", "Dataset802_TinyCT"]
    assert 0 < info.ood_threshold <= 1


def test_a_prepared_file_must_match_the_run_and_stand_alone(data: list[Path], prepared_file: Path) -> None:
    with pytest.raises(ValueError, match="patch 16, val_fraction 0.2 and split seed 3, but the run asks for 32, 0.2 "
                                         "and 3"):
        prepared.for_run([str(prepared_file)], 32, 0.2, 3)
    with pytest.raises(ValueError, match="asks for 16, 0.2 and 4: .*`split_seed`"):
        prepared.for_run([str(prepared_file)], 16, 0.2, 4)
    with pytest.raises(ValueError, match="give it alone"):
        prepared.for_run([str(prepared_file), str(data[0])], 16, 0.2, 3)
    with pytest.raises(ValueError, match="list the dataset folders as `data:`, or set prior_native_fraction: 0"):
        prepared.for_run([str(prepared_file)], 16, 0.2, 3, native=True)


def test_files_that_are_not_prepared_slices_name_the_fix(prepared_file: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.vldun"
    plain.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="make it again with `vldun prepare`"):
        prepared.load(plain)
    other = tmp_path / "other.vldun"
    other.write_bytes(gzip.compress(json.dumps({"a": 1}).encode()))
    with pytest.raises(ValueError, match="is not a prepared-slices file"):
        prepared.load(other)
    with pytest.raises(ValueError, match=r"must end in \.vldun"):
        prepared.save(prepared.load(prepared_file), tmp_path / "slices.safetensors")


def test_preparing_an_already_prepared_run_is_refused(
    prepared_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"data": [str(prepared_file)], "out": str(tmp_path / "run")})
    assert main(["prepare", str(config), "--out", str(tmp_path / "again.vldun")]) == 2
    assert "already a prepared file" in capsys.readouterr().err
    assert not (tmp_path / "again.vldun").exists()
