"""A recipe's run across sessions and machines: pausing, exact and refused resumes, the GPU block, clean samples,
and what the exported model records about its making."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_train import data, run_settings, tensors, write_config  # noqa: F401 (data: fixture)
from vldun_lab import train
from vldun_lab.datasets import read_datasets
from vldun_lab.train import CLEAN, degradation_table, degrade_batch, load_run_config, train_from_file
from VLDUNLib.config import NO_DEGRADATION
from VLDUNLib.degradations import DEGRADATIONS
from VLDUNLib.weights import read_model_info

WITH_NONE = [*DEGRADATIONS, NO_DEGRADATION]


def clean_settings(data: list[Path], out: Path) -> dict[str, Any]:  # noqa: F811
    settings = run_settings(data, out)
    settings["model"] = {**settings["model"], "degradations": WITH_NONE}
    settings["clean_fraction"] = 0.5
    return settings


@pytest.fixture(scope="module")
def uninterrupted(data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("whole")
    train_from_file(write_config(folder, clean_settings(data, folder / "run")))
    return folder / "run"


def test_a_session_that_runs_out_pauses_and_its_resume_equals_an_uninterrupted_run(
    data: list[Path], uninterrupted: Path, tmp_path: Path  # noqa: F811
) -> None:
    config = write_config(tmp_path, clean_settings(data, tmp_path / "run"))
    assert train_from_file(config, session_minutes=1e-9) is None  # every step is past the deadline
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (state["stage"], state["step"]) == ("prior", 1) and not (tmp_path / "run" / "model.safetensors").exists()
    while train_from_file(config, resume=True, session_minutes=1e-9) is None:
        pass
    expected, actual = tensors(uninterrupted), tensors(tmp_path / "run")
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    sessions = read_model_info(tmp_path / "run" / "model.safetensors")[1].extra["sessions"]
    assert len(sessions) == 5  # one step per session, and a stage's last step runs on into the next stage
    assert all(s["machine"] and s["code"] and s["scan"] and s["seconds"] >= 0 for s in sessions)
    assert sessions[0]["from"] == ["prior", 0] and sessions[-1]["to"] == ["joint", 4]
    table = (tmp_path / "run" / "provenance.md").read_text().splitlines()
    assert table[0] == "Trained by `vldun train run.yaml` in 5 session(s):"
    assert [row.split(" | ")[4:6] for row in table[4:9]] == [
        ["prior 0", "prior 1"], ["prior 1", "joint 1"], ["joint 1", "joint 2"], ["joint 2", "joint 3"], ["joint 3", "joint 4"]]


def test_a_stop_signal_pauses_after_the_step_under_way_and_the_run_resumes(
    data: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    config = write_config(tmp_path, clean_settings(data, tmp_path / "run"))
    step = train.Trainer.train_step

    def signalled(self: train.Trainer, stage: str, index: int, *args: Any) -> dict[str, float]:
        if (stage, index) == ("joint", 1):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` from a shell while the step runs
        return step(self, stage, index, *args)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train.Trainer, "train_step", signalled)
    assert train_from_file(config) is None
    state = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert (state["stage"], state["step"]) == ("joint", 2) and signal.getsignal(signal.SIGTERM) is handler
    assert "Paused at stage joint, step 2 of 4: stopped by SIGTERM" in capsys.readouterr().out
    monkeypatch.undo()
    assert train_from_file(config, resume=True) is not None


def test_a_resume_with_changed_settings_is_refused_naming_them(data: list[Path], tmp_path: Path) -> None:  # noqa: F811
    settings = clean_settings(data, tmp_path / "run")
    config = write_config(tmp_path, settings)
    train_from_file(config, session_minutes=1e-9)
    write_config(tmp_path, {**settings, "joint": {**settings["joint"], "lr": 0.5}, "threads": 2})
    with pytest.raises(ValueError, match=r"other settings: joint changed"):
        train_from_file(config, resume=True)


def test_a_fresh_start_over_a_checkpoint_is_refused(data: list[Path], tmp_path: Path) -> None:  # noqa: F811
    config = write_config(tmp_path, clean_settings(data, tmp_path / "run"))
    train_from_file(config, session_minutes=1e-9)
    with pytest.raises(ValueError, match="already holds a checkpoint: continue it with --resume"):
        train_from_file(config)


def test_out_replaces_the_config_folder(data: list[Path], tmp_path: Path) -> None:  # noqa: F811
    config = write_config(tmp_path, clean_settings(data, tmp_path / "run"))
    train_from_file(config, out=tmp_path / "elsewhere", session_minutes=1e-9)
    assert (tmp_path / "elsewhere" / "checkpoint.json").is_file() and not (tmp_path / "run").exists()


def test_the_gpu_block_applies_on_cuda_only(data: list[Path], tmp_path: Path) -> None:  # noqa: F811
    settings = {**clean_settings(data, tmp_path / "run"), "gpu": {"joint": {"batch_size": 64}, "amp": False}}
    config = write_config(tmp_path, settings)
    on_cpu, on_gpu = load_run_config(config, cuda=False), load_run_config(config, cuda=True)
    assert (on_cpu.joint.batch_size, on_cpu.amp) == (2, True)
    assert (on_gpu.joint.batch_size, on_gpu.joint.lr, on_gpu.amp) == (64, 1e-3, False)
    write_config(tmp_path, {**settings, "gpu": {"out": "x"}})
    with pytest.raises(ValueError, match="gpu:"):
        load_run_config(config)


def test_clean_samples_are_kept_and_labelled_none() -> None:
    clean = torch.rand(64, 1, 16, 16)
    generator = torch.Generator().manual_seed(0)
    degraded, labels = degrade_batch(clean, ["MRI"] * 64, generator, primitives=True, chunk=1, clean_fraction=0.5)
    kept = labels == CLEAN
    assert 16 < int(kept.sum()) < 48
    assert torch.equal(degraded[kept], clean[kept]) and not torch.equal(degraded[~kept], clean[~kept])
    table = degradation_table(WITH_NONE, 0.5)
    assert [WITH_NONE[i] for i in table[labels].tolist()] == [
        NO_DEGRADATION if k else DEGRADATIONS[int(label)] for k, label in zip(kept.tolist(), labels)
    ]


def test_without_clean_samples_the_draws_are_those_of_before() -> None:
    clean = torch.rand(8, 1, 16, 16)
    first = degrade_batch(clean, ["CT"] * 8, torch.Generator().manual_seed(3), primitives=True)
    again = degrade_batch(clean, ["CT"] * 8, torch.Generator().manual_seed(3), primitives=True, clean_fraction=0.0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and (first[1] != CLEAN).all()


def test_clean_samples_need_the_none_class() -> None:
    with pytest.raises(ValueError, match="needs 'none' in model.degradations"):
        degradation_table(DEGRADATIONS, 0.1)
    with pytest.raises(ValueError, match="lacks"):
        degradation_table(DEGRADATIONS[:5], 0.0)


def test_the_prior_is_taught_none_for_clean_slices(data: list[Path], tmp_path: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    taught: list[torch.Tensor] = []
    original = train.image_text_loss
    monkeypatch.setattr(train, "image_text_loss", lambda logits, labels: taught.append(labels) or original(logits, labels))
    settings = {**clean_settings(data, tmp_path / "run"), "clean_fraction": 1.0}
    train_from_file(write_config(tmp_path, settings), session_minutes=1e-9)
    assert set(torch.cat(taught).tolist()) == {WITH_NONE.index(NO_DEGRADATION)}


def test_the_export_records_its_training_and_validation_cases_and_recipe(
    uninterrupted: Path, data: list[Path]  # noqa: F811
) -> None:
    info = read_model_info(uninterrupted / "model.safetensors")[1]
    assert info.config.degradations == tuple(WITH_NONE)
    for dataset in read_datasets(data):
        trained, held_out = info.extra["training_cases"][dataset.name], info.extra["validation_cases"][dataset.name]
        assert sorted(trained + held_out) == sorted(c.case_id for c in dataset.cases) and not set(trained) & set(held_out)
    assert info.extra["recipe"] == "run.yaml"


def test_the_recipe_records_where_it_lies_in_the_repository() -> None:
    recipe = Path(train.__file__).resolve().parents[2] / "recipes" / "vldun_compact.yaml"
    assert train.recipe_name(recipe) == "recipes/vldun_compact.yaml"
    assert yaml.safe_load(recipe.read_text())["calibrate_ood"] is True


def test_a_setting_added_since_the_checkpoint_counts_as_unchanged_at_its_default(tmp_path: Path) -> None:
    run = train.RunConfig(data=["x"], out=str(tmp_path))
    recorded = train.resume_identity(run)
    del recorded["calibrate_ood"]
    train.check_resumable({"run": recorded}, run, tmp_path)
    with pytest.raises(ValueError, match="calibrate_ood changed"):
        train.check_resumable({"run": recorded}, train.RunConfig(data=["x"], out=str(tmp_path), calibrate_ood=True),
                              tmp_path)


def test_a_checkpoint_exports_as_interim_weights_without_touching_the_run(
    data: list[Path], tmp_path: Path  # noqa: F811
) -> None:
    config = write_config(tmp_path, clean_settings(data, tmp_path / "run"))
    train_from_file(config, session_minutes=1e-9)
    while json.loads((tmp_path / "run" / "checkpoint.json").read_text())["stage"] != "joint":
        train_from_file(config, resume=True, session_minutes=1e-9)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    weights = train_from_file(config, export_checkpoint=tmp_path / "interim.safetensors")
    from VLDUNLib.weights import load_model

    model, info = load_model(weights)
    checkpoint = tensors(tmp_path / "run", "checkpoint.safetensors")
    assert all(torch.equal(v, checkpoint[f"model.{k}"]) for k, v in model.state_dict().items())
    assert info.extra["interim"] == {"stage": "joint", "step": 1, "of": 4} and len(info.extra["sessions"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # no model.safetensors, no provenance


def test_time_steps_times_each_stage_and_writes_nothing(data: list[Path], tmp_path: Path,  # noqa: F811
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, run_settings(data, tmp_path / "run"))
    assert train_from_file(config, time_steps=1) is None
    printed = capsys.readouterr().out
    assert "prior: " in printed and "joint (" in printed and printed.count("s per step") >= 2
    if "compiled CPU kernel" in printed:
        assert "joint (PyTorch scan)" in printed
    assert not (tmp_path / "run").exists()


def test_threads_override_the_config_and_are_checked(data: list[Path], tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, run_settings(data, tmp_path / "run"))
    before = torch.get_num_threads()
    try:
        train_from_file(config, time_steps=1, threads=2)  # the config says 1
        assert "2 thread(s) of" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        train_from_file(config, time_steps=1, threads=0)


def test_a_restated_session_says_so_on_the_card() -> None:
    sessions = [{"started": "2026-12-07T18:19:02Z", "machine": "cpu", "code": "0e408547afe9", "from": ["prior", 0],
                 "to": ["prior", 24000], "seconds": 60.0,
                 "restated": "recorded as 71d2ab860087+changes; the changes were committed unchanged as 0e40854"}]
    table = train.provenance_table("recipes/x.yaml", sessions)
    assert "| 0e408547afe9 (restated: recorded as 71d2ab860087+changes; the changes were committed" in table
    assert "restated" not in train.provenance_table("recipes/x.yaml", [{**sessions[0], "restated": ""}])
