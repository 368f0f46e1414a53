"""Issue 40: nothing lost, nothing corrupt marked done. Every defect found by the review has a test here:
writes that fail or are interrupted, truncated or unsuitable inputs, outputs colliding with inputs, models
whose JSON was edited or names a remote CLIP, orphaned workers, resuming with other settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from model_factory import tiny_predictor
from VLDUNLib import weights as weights_module
from VLDUNLib.cli import main
from VLDUNLib.weights import WeightsError, read_model_info, rewrite_info, save_weights

VLDUN_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    predictor = tiny_predictor()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(predictor.model, predictor.info, path)
    return path


def copy_model(weights: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / weights.name
    target.write_bytes(weights.read_bytes())
    target.with_suffix(".json").write_text(weights.with_suffix(".json").read_text())
    return target


def scan(folder: Path, name: str = "scan.nii.gz", shape=(4, 20, 18), seed: int = 0, dtype=np.float32,
         array: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).normal(100, 30, shape).astype(dtype)
    path = folder / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


# --- 5. the model's JSON is sealed -------------------------------------------------------------------------

def test_swapping_two_class_names_is_refused(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["classes"][1], meta["classes"][2] = meta["classes"][2], meta["classes"][1]
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="config_sha256"):
        read_model_info(model)


def test_editing_the_ood_threshold_is_refused_and_rewrite_info_reseals(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["ood_threshold"] = 0.9
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="config_sha256"):
        read_model_info(model)
    _, info = read_model_info(weights)
    info.extra = {"note": "added later"}
    tensors = model.read_bytes()
    rewrite_info(model, info)
    assert read_model_info(model)[1].extra == {"note": "added later"}
    assert model.read_bytes() == tensors


def test_shipped_models_are_sealed_and_carry_no_machine_paths():
    shipped = VLDUN_DIR / "Resources" / "Models" / "vldun_compact.safetensors"
    baseline = VLDUN_DIR.parent / "lab" / "models" / "unet_baseline.safetensors"
    assert weights_module.sha256_of(shipped) == "c358fa1afaf41c1c38d05c4380a17412df45904df22cc9a4ca1663fe1f7b7391"
    for model in (shipped, baseline):
        read_model_info(model)
        text = model.with_suffix(".json").read_text()
        assert "/work/" not in text and '"/' not in text


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100000 + "]" * 100000, '{"format": "vldun-weights/1", "config": 3}'])
def test_malformed_model_json_is_a_weights_error(tmp_path, weights, content):
    model = copy_model(weights, tmp_path)
    model.with_suffix(".json").write_text(content)
    with pytest.raises(WeightsError):
        read_model_info(model)


# --- 6. the prior may not name a remote or pickled CLIP -------------------------------------------------

@pytest.mark.parametrize("name", ["hf-hub:someone/model", "local-dir:/tmp/x", "../ViT-B-16", "NoSuchModel"])
def test_open_clip_model_names_only_builtin_architectures(name):
    from VLDUNLib.config import PriorConfig
    from VLDUNLib.priors import build_clip

    with pytest.raises(ValueError, match="open_clip"):
        build_clip(PriorConfig(open_clip_model=name))


def test_a_model_json_naming_hf_hub_is_refused(tmp_path, weights):
    model = copy_model(weights, tmp_path)
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["config"]["prior"]["open_clip_model"] = "hf-hub:evil/model"
    meta["config_sha256"] = weights_module.config_sha256(meta)
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="open_clip_model"):
        read_model_info(model)
