"""The shipped model's recipe, end to end at smoke size: `recipes/vldun_compact_smoke.yaml` is the recipe itself at a
few steps, run here on five small stand-ins for its datasets (same folder names, imaging, classes and channels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from model_factory import tiny_predictor
from safetensors.torch import load_file
from vldun_lab.evaluate import check_ablation, prior_fingerprint
from vldun_lab.train import load_run_config, train_from_file
from VLDUNLib.config import NO_DEGRADATION
from VLDUNLib.inference import VolumePredictor
from VLDUNLib.weights import read_model_info, save_weights

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
STAND_INS = {
    "Dataset001_ACDC": ("MRI", "cardiac cine MRI", ["MRI"], ["RV", "MYO", "LV"]),
    "Dataset002_BraTS2015": ("MRI", "brain MRI", ["T1c", "FLAIR"], ["necrosis", "edema", "non_enhancing", "enhancing"]),
    "Dataset003_COVID19CT": ("CT", "lung CT", ["CT"], ["infection"]),
    "Dataset004_AbdomenCT": ("CT", "abdominal CT", ["CT"], ["liver", "spleen", "kidney_right", "kidney_left"]),
    "Dataset007_BraTS2018": ("MRI", "brain MRI", ["FLAIR", "T1"], ["whole_tumor"]),
}


def stand_in(root: Path, imaging: str, modality: str, channels: list[str], labels: list[str], seed: int) -> Path:
    """Five 48x48x4 cases: a disc per class, each channel its own contrast, intensities as the scanner gives them."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    yy, xx = np.mgrid[:48, :48]
    for index in range(5):
        label = np.zeros((4, 48, 48), np.uint8)
        for value in range(1, len(labels) + 1):
            cy, cx = rng.integers(10, 38, 2)
            label[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 30] = value
        case = f"{root.name.split('_')[1].lower()}_{index:03d}"
        for channel in range(len(channels)):
            base, scale = (-900.0, 1200.0) if imaging == "CT" else (20.0, 300.0 * (channel + 1))
            image = base + scale * (label / len(labels) + 0.2 * rng.random(label.shape))
            sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)),
                            str(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labelsTr" / f"{case}.nii.gz"))
    meta = {"name": root.name.split("_", 1)[1], "modality": modality,
            "channel_names": dict(enumerate(channels)), "labels": {"background": 0} | {n: i + 1 for i, n in enumerate(labels)},
            "numTraining": 5, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke recipe on the stand-ins: one session cut after its first step, then resumed to the end."""
    root = tmp_path_factory.mktemp("smoke")
    data = [stand_in(root / "data" / name, *spec, seed=i) for i, (name, spec) in enumerate(STAND_INS.items())]
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump({"base": str(RECIPES / "vldun_compact_smoke.yaml"),
                                      "data": [str(d) for d in data], "out": str(root / "run")}))
    assert train_from_file(config, session_minutes=1e-9) is None
    assert json.loads((root / "run" / "checkpoint.json").read_text())["step"] == 1
    weights = train_from_file(config, resume=True)
    assert weights == root / "run" / "model.safetensors"
    return weights


def test_the_smoke_recipe_is_the_shipped_recipe_but_for_its_length() -> None:
    full, smoke = (load_run_config(RECIPES / name, cuda=False) for name in ("vldun_compact.yaml", "vldun_compact_smoke.yaml"))
    differ = {k for k in vars(full) if getattr(full, k) != getattr(smoke, k)}
    assert differ == {"out", "patch", "prior", "joint", "checkpoint_every", "gpu"}
    assert [Path(d).name for d in full.data] == list(STAND_INS)


def test_the_smoke_recipe_exports_a_calibrated_model_with_the_none_class_and_every_task(smoke_run: Path) -> None:
    _, info = read_model_info(smoke_run)
    assert NO_DEGRADATION in info.config.degradations and info.ood is not None
    assert list(info.tasks) == ["heart", "brain_tumour", "lung_infection", "abdominal_organs"]
    assert info.tasks["brain_tumour"].datasets == ("BraTS2015", "BraTS2018")
    assert info.modality_names["BraTS2018/T1"] == "MRI · brain, T1"
    assert info.extra["recipe"] == "recipe.yaml" and len(info.extra["sessions"]) == 2
    assert info.extra["run"]["data"] == list(STAND_INS) and info.extra["run"]["joint"]["steps"] == 4
    assert str(smoke_run.parents[1]) not in smoke_run.with_suffix(".json").read_text()  # shipped: no machine paths
    assert sum(map(len, info.extra["training_cases"].values())) == 5 * 4


def test_the_smoke_model_predicts_a_volume(smoke_run: Path) -> None:
    predictor = VolumePredictor(smoke_run, device="cpu")
    volume = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32) * 500
    result = predictor.predict(volume, task="heart")
    assert result.restored.shape == volume.shape and np.isfinite(result.restored).all()
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
    assert all(torch.isfinite(t).all() for t in load_file(str(smoke_run)).values())


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_reads_on_a_cpu_and_on_a_gpu(path: Path) -> None:
    for cuda in (False, True):
        assert load_run_config(path, cuda=cuda).joint.steps > 0


@pytest.mark.parametrize(("name", "setting"), [
    ("segment_native", "segment_native"), ("seg_weight_2", "seg_weight"), ("width_36", "model"),
    ("psnr_uncapped", "psnr_cap_db"),
])
def test_a_design_comparison_differs_from_its_control_in_its_setting_alone(name: str, setting: str) -> None:
    control = load_run_config(RECIPES / "ablations" / "full.yaml", cuda=False)
    variant = load_run_config(RECIPES / "comparisons" / f"{name}.yaml", cuda=False)
    differ = {k for k in vars(control) if getattr(control, k) != getattr(variant, k)}
    assert differ == {"out", setting}
    if setting == "model":
        extra = {k: v for k, v in variant.model.items() if control.model.get(k) != v}
        assert extra == {"channels": 36, "blocks": [1, 1, 2]}


def test_an_ablation_row_from_another_prior_than_the_full_rows_is_refused(tmp_path: Path) -> None:
    """Rows train stage 2 on a copy of the shipped prior; if the shipped weights change between two rows, the
    row's evaluation must refuse rather than report a difference that mixes in a new prior."""
    full, row = tiny_predictor(), tiny_predictor(ablation="no_fd")
    torch.manual_seed(1)
    for p in row.model.prior.parameters():
        p.data.normal_()
    save_weights(full.model, full.info, tmp_path / "full.safetensors")
    save_weights(row.model, row.info, tmp_path / "row.safetensors")
    with pytest.raises(ValueError, match="different CLIP priors"):
        check_ablation(row, "no_fd", tmp_path / "row.safetensors", tmp_path / "full.safetensors")
    row.model.prior.load_state_dict(full.model.prior.state_dict())  # the same prior, the rest still its own
    save_weights(row.model, row.info, tmp_path / "row.safetensors")
    check_ablation(row, "no_fd", tmp_path / "row.safetensors", tmp_path / "full.safetensors")
    assert prior_fingerprint(tmp_path / "row.safetensors") == prior_fingerprint(tmp_path / "full.safetensors")
