"""Weights: safetensors only, SHA-256 checked, config validated before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
from model_factory import tiny_config
from VLDUNLib.network import VLDUN
from VLDUNLib.weights import (
    ModelInfo,
    WeightsError,
    config_sha256,
    load_model,
    save_weights,
)


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = VLDUN(config).eval()
    info = ModelInfo(config, ["background", "A/x", "A/y", "B/z"], {"A": [1, 2], "B": [3]}, 0.4, train_size=96)
    path = tmp_path / "model.safetensors"
    save_weights(model, info, path)
    return model, path


def test_round_trip_gives_the_same_outputs(saved):
    model, path = saved
    loaded, info = load_model(path)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x).restored, loaded(x).restored)
        assert torch.equal(model(x).seg_logits, loaded(x).seg_logits)
    assert info.dataset_classes == {"A": [1, 2], "B": [3]} and info.ood_threshold == 0.4
    assert info.train_size == 96


@pytest.mark.parametrize("size", [8, 96.5, "128", True])
def test_bad_training_size_is_refused(saved, size):
    _, path = saved
    edit_config(path, lambda m: m.update(train_size=size))
    with pytest.raises(WeightsError, match="train_size"):
        load_model(path)


def test_sha256_is_in_the_config(saved):
    _, path = saved
    import hashlib

    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tampered_weights_are_refused(saved, load=load_model):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        load(path)


def edit_config(path, change):
    json_path = path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    change(meta)
    meta["config_sha256"] = config_sha256(meta)  # sealed, so that the content checks behind the seal are reached
    json_path.write_text(json.dumps(meta))


def test_unknown_preset_is_refused(saved):
    _, path = saved
    edit_config(path, lambda m: m["config"].update(preset="huge"))
    with pytest.raises(WeightsError, match="unknown preset"):
        load_model(path)


def test_missing_class_names_are_refused(saved):
    _, path = saved
    edit_config(path, lambda m: m.update(classes=["background"]))
    with pytest.raises(WeightsError, match="class names"):
        load_model(path)


def test_mismatched_tensor_shapes_are_refused(saved):
    _, path = saved
    edit_config(path, lambda m: m["config"].update(channels=16))
    with pytest.raises(WeightsError, match="shape"):
        load_model(path)


def test_pickles_and_missing_configs_are_refused(saved, tmp_path):
    _, path = saved
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="safetensors"):
        load_model(pickled)
    path.with_suffix(".json").unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_model(path)


def test_names_tasks_and_ood_statistics_survive_the_round_trip(tmp_path):
    import numpy as np
    from VLDUNLib.ood import NearestNeighbourOOD, unit_rows
    from VLDUNLib.tasks import Task
    from VLDUNLib.weights import rewrite_info

    config = tiny_config(modalities=("A/MRI", "B/CT"))
    ood = NearestNeighbourOOD(unit_rows(np.random.default_rng(0).normal(size=(5, 16))), 0.25)
    info = ModelInfo(config, ["background", "A/x", "A/y", "B/z"], {"A": [1, 2], "B": [3]},
                     modality_names={"A/MRI": "MRI · heart, cine"}, tasks={"heart": Task("Heart", ("A",), (1, 2))},
                     ood=ood)
    path = tmp_path / "model.safetensors"
    save_weights(VLDUN(config).eval(), info, path)
    _, loaded = load_model(path)
    assert loaded.modality_names == {"A/MRI": "MRI · heart, cine", "B/CT": "B/CT"}
    assert loaded.tasks == {"heart": Task("Heart", ("A",), (1, 2))}
    assert loaded.ood.threshold == 0.25 and np.array_equal(loaded.ood.references, ood.references)
    loaded.ood = NearestNeighbourOOD(ood.references, 0.5)
    rewrite_info(path, loaded)
    assert load_model(path)[1].ood.threshold == 0.5


def test_a_config_without_names_or_tasks_gets_the_shipped_defaults(saved):
    _, path = saved
    _, info = load_model(path)
    assert info.modality_names["ACDC/MRI"] == "MRI · heart, cine" and info.ood is None
    assert {k: t.classes for k, t in info.tasks.items()} == {"A": (1, 2), "B": (3,)}


def test_shipped_model_has_the_four_tasks_and_readable_modalities():
    from VLDUNLib.weights import DEFAULT_WEIGHTS, read_model_info

    _, info = read_model_info(DEFAULT_WEIGHTS)
    assert list(info.tasks) == ["heart", "brain_tumour", "lung_infection", "abdominal_organs"]
    assert info.tasks["brain_tumour"].classes == (4, 5, 6, 7, 12)  # BraTS 2015's four sub-regions, BraTS 2018's whole tumour
    assert info.modality_names["BraTS2015/FLAIR"] == "MRI · brain, FLAIR"
    assert info.modality_names["BraTS2018/T1"] == "MRI · brain, T1" and info.config.degradations[-1] == "none"


def test_task_classes_outside_the_head_are_refused(saved):
    _, path = saved
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["tasks"] = {"heart": {"label": "Heart", "datasets": ["A"], "classes": [1, 9]}}
    meta["config_sha256"] = config_sha256(meta)  # sealed, so that the task check behind the seal is reached
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="task class indices"):
        load_model(path)


def test_segment_native_is_false_unless_the_json_says_true(saved):
    _, path = saved
    assert load_model(path)[1].segment_native is False
    edit_config(path, lambda m: m.pop("segment_native"))  # a JSON written before the field existed
    assert load_model(path)[1].segment_native is False
    edit_config(path, lambda m: m.update(segment_native=True))
    assert load_model(path)[1].segment_native is True
    edit_config(path, lambda m: m.update(segment_native="yes"))
    with pytest.raises(WeightsError, match="segment_native must be true or false"):
        load_model(path)


def test_ood_references_of_another_prior_are_refused_on_load(tmp_path):
    import numpy as np
    from VLDUNLib.ood import NearestNeighbourOOD

    config = tiny_config(modalities=("A/MRI", "B/CT"))
    info = ModelInfo(config, ["background", "A/x", "A/y", "B/z"], {"A": [1, 2], "B": [3]},
                     ood=NearestNeighbourOOD(np.eye(3), 0.2))
    path = tmp_path / "model.safetensors"
    save_weights(VLDUN(config).eval(), info, path)
    with pytest.raises(WeightsError, match="length 3 do not fit"):
        load_model(path)
