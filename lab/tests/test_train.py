"""Two-stage training on tiny synthetic datasets: exact resume in a fresh process, the per-step RNG, the
learning-rate schedule, the class-masked segmentation loss, run configs, the exported model and the CSV log.

One uninterrupted run and one run interrupted mid-stage then resumed by `vldun train --resume` in another
Python process (another hash salt) are trained once per module; the tests read their outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml
from model_factory import TINY_PRIOR
from safetensors.torch import load_file
from vldun_lab import train
from vldun_lab.augmentation import Augmentation
from vldun_lab.datasets import read_datasets
from vldun_lab.splits import split_cases, split_seed_of
from vldun_lab.train import (
    RunConfig,
    StageConfig,
    learning_rate,
    load_run_config,
    segmentation_loss,
    step_generator,
    train_from_file,
)
from VLDUNLib.degradations import Degraded
from VLDUNLib.weights import load_model, sha256_of

PRIOR_STEPS, JOINT_STEPS, STOP_AT = 2, 4, 2
"""Stage lengths of the tiny runs; the interrupted run stops after the checkpoint of joint step STOP_AT."""
TINY_MODEL: dict[str, Any] = dict(
    channels=8, levels=2, blocks=[1, 1], d_state=4, expand=1.0, attn_heads=2, prior=dataclasses.asdict(TINY_PRIOR)
)
PRIOR_STAGE = {"steps": PRIOR_STEPS, "batch_size": 4, "warmup": 1, "lr": 1e-3}
JOINT_STAGE = {"steps": JOINT_STEPS, "batch_size": 2, "warmup": 1, "lr": 1e-3}
DRAW_SCRIPT = (
    "import torch; from vldun_lab.train import step_generator; print(hash('vldun')); "
    "print(torch.rand(4, generator=step_generator(7, 'joint', 3, 1)).tolist())"
)


# ------------------------------------------------------------------------------------------ synthetic data


def write_dataset(root: Path, imaging: str, labels: list[str], seed: int, cases: int = 3, slices: int = 4) -> Path:
    """An nnU-Net folder of `cases` 24x24x`slices` .mha volumes: one disc per class, brighter per class, plus noise."""
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    yy, xx = np.mgrid[:24, :24]
    for index in range(cases):
        label = np.zeros((slices, 24, 24), np.uint8)
        for value in range(1, len(labels) + 1):
            cy, cx = rng.integers(6, 18, 2)
            label[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 16] = value
        scale = (800.0, -900.0) if imaging == "CT" else (300.0, 20.0)
        image = scale[1] + scale[0] * (label / len(labels) + 0.1 * rng.random(label.shape))
        case_id = f"{root.name.lower()}_{index:03d}"
        image_path = root / "imagesTr" / f"{case_id}_0000.mha"
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(image_path))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labelsTr" / f"{case_id}.mha"))
    meta = {
        "name": root.name.split("_", 1)[1], "modality": f"tiny {imaging}", "channel_names": {"0": imaging},
        "labels": {name: value for value, name in enumerate(["background", *labels])},
        "numTraining": cases, "file_ending": ".mha",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two datasets, an MRI one with two classes and a CT one with one, so the shared head has 4 classes."""
    root = tmp_path_factory.mktemp("data")
    return [
        write_dataset(root / "Dataset801_TinyMRI", "MRI", ["cavity", "wall"], seed=1),
        write_dataset(root / "Dataset802_TinyCT", "CT", ["organ"], seed=2),
    ]


def run_settings(data: list[Path], out: Path) -> dict[str, Any]:
    """A complete tiny run config as YAML would hold it: every stage a few steps, one thread.

    The paths are absolute, so a broken path resolution cannot write a run into the working directory.
    """
    return {
        "data": [str(d) for d in data], "out": str(out), "model": TINY_MODEL, "seed": 3, "patch": 16, "threads": 1,
        "prior": PRIOR_STAGE, "joint": JOINT_STAGE,
        "primitive_fraction": 0.5, "checkpoint_every": STOP_AT,
    }


def write_config(folder: Path, settings: dict[str, Any], name: str = "run.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(settings))
    return path


# -------------------------------------------------------------------------------------------------- runs


class Interrupted(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def interrupt_after(stage: str, step: int) -> Callable[..., None]:
    """`save_checkpoint` that saves, then stops training once the checkpoint of (stage, step) is on disk."""
    original = train.save_checkpoint

    def save_then_stop(out: Path, model: Any, optimizer: Any, saved_stage: str, saved_step: int, *record: Any) -> None:
        original(out, model, optimizer, saved_stage, saved_step, *record)
        if (saved_stage, saved_step) == (stage, step):
            raise Interrupted

    return save_then_stop


def other_hash_seed() -> str:
    """A PYTHONHASHSEED other than this process's, so the child salts str hashes differently."""
    return "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": other_hash_seed(), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of an uninterrupted run in this process."""
    folder = tmp_path_factory.mktemp("reference")
    train_from_file(write_config(folder, run_settings(data, folder / "run")))
    return folder / "run"


class Resumed(NamedTuple):
    run: Path
    stop: dict[str, Any]
    """checkpoint.json at the interruption."""
    stop_model: dict[str, torch.Tensor]
    """The model tensors of the checkpoint at the interruption."""


@pytest.fixture(scope="module")
def resumed(data: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    """The same run stopped after joint step STOP_AT here, finished by `vldun train --resume` in a child process."""
    folder = tmp_path_factory.mktemp("resumed")
    run = folder / "run"
    config = write_config(folder, run_settings(data, run))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "save_checkpoint", interrupt_after("joint", STOP_AT))
        with pytest.raises(Interrupted):
            train_from_file(config)
    assert not (run / "model.safetensors").exists(), "the interrupted run must not have exported"
    stop = json.loads((run / "checkpoint.json").read_text())
    stop_model = {k[6:]: v for k, v in tensors(run, "checkpoint.safetensors").items() if k.startswith("model.")}
    command = [sys.executable, "-m", "VLDUNLib.cli", "train", str(config), "--resume"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return Resumed(run, stop, stop_model)


def tensors(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


# ------------------------------------------------------------------------------------------ exact resume


def test_resume_in_a_fresh_process_is_bitwise_equal_to_an_uninterrupted_run(
    reference: Path, resumed: Resumed
) -> None:
    assert (resumed.stop["stage"], resumed.stop["step"]) == ("joint", STOP_AT)
    expected, actual = tensors(reference), tensors(resumed.run)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
    at_stop = resumed.stop_model
    assert at_stop.keys() == expected.keys()
    assert any(not torch.equal(at_stop[k], actual[k]) for k in actual), "the resumed process trained no step"
    assert json.loads((resumed.run / "checkpoint.json").read_text())["step"] == JOINT_STEPS


# --------------------------------------------------------------------------------------------- step RNG


def test_step_generator_is_the_same_in_a_process_with_another_hash_salt() -> None:
    child = subprocess.run(
        [sys.executable, "-c", DRAW_SCRIPT], env=child_env(), capture_output=True, text=True, timeout=60, check=True
    )
    child_hash, child_draws = child.stdout.split("\n")[:2]
    assert int(child_hash) != hash("vldun"), "the child must salt str hashes differently for this test to mean anything"
    assert json.loads(child_draws) == torch.rand(4, generator=step_generator(7, "joint", 3, 1)).tolist()


def test_step_generator_draws_differ_between_steps_ranks_stages_and_seeds() -> None:
    def draws(*identity: Any) -> tuple[float, ...]:
        return tuple(torch.rand(4, generator=step_generator(*identity)).tolist())

    base = draws(7, "joint", 3, 1)
    assert draws(7, "joint", 3, 1) == base
    variants = [draws(7, "joint", 4, 1), draws(7, "joint", 3, 0), draws(7, "prior", 3, 1), draws(8, "joint", 3, 1)]
    assert len({base, *variants}) == 5


# ------------------------------------------------------------------------------------ learning-rate schedule


def test_learning_rate_warms_up_linearly_then_decays_to_one_percent() -> None:
    stage = StageConfig(steps=100, lr=2e-3, warmup=10)
    assert [learning_rate(stage, s) for s in range(10)] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    assert learning_rate(stage, 10) == pytest.approx(2e-3), "the peak right after warm-up"
    assert learning_rate(stage, 100) == pytest.approx(2e-5) and learning_rate(stage, 500) == pytest.approx(2e-5)
    assert learning_rate(stage, 55) == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5)), "half-way down the cosine"
    after = [learning_rate(stage, s) for s in range(10, 101)]
    assert all(b <= a for a, b in zip(after, after[1:])) and after[0] > after[-1]


def test_time_fraction_drives_the_decay_when_ahead_of_the_steps() -> None:
    stage = StageConfig(steps=100, lr=1e-3, warmup=10)
    assert learning_rate(stage, 12, time_fraction=1.0) == pytest.approx(1e-5)
    assert learning_rate(stage, 12, time_fraction=0.5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert learning_rate(stage, 90, time_fraction=0.1) == learning_rate(stage, 90), "the step fraction is larger"


# ---------------------------------------------------------------------------------------- segmentation loss


@pytest.fixture
def seg_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 8x8 samples over 5 global classes: sample 0 may use classes 0-2, sample 1 classes 0, 3, 4."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    own_classes = [torch.randint(0, 3, (8, 8), generator=generator), torch.randint(3, 5, (8, 8), generator=generator)]
    target = torch.stack(own_classes)
    target[1, :2] = 0
    logits = torch.randn(2, 5, 8, 8, generator=generator)
    return logits, target, mask


def test_classes_outside_a_samples_mask_do_not_change_the_loss(seg_case: tuple[torch.Tensor, ...]) -> None:
    logits, target, mask = seg_case
    before = logits.clone()
    loss = segmentation_loss(logits, target, mask)
    assert torch.equal(logits, before), "the logits are not modified in place"
    foreign = logits.clone()
    foreign[~mask] = torch.randn(int((~mask).sum()), 8, 8) * 50
    assert torch.equal(segmentation_loss(foreign, target, mask), loss)
    own = logits.clone()
    own[0, 1] += 3.0
    assert not torch.equal(segmentation_loss(own, target, mask), loss), "a class inside the mask counts"


def test_perfect_prediction_has_near_zero_loss_and_a_wrong_one_more(seg_case: tuple[torch.Tensor, ...]) -> None:
    _, target, mask = seg_case
    onehot = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    perfect = segmentation_loss(20 * onehot, target, mask)
    assert 0 <= perfect.item() < 1e-3
    wrong = segmentation_loss(20 * onehot.roll(1, dims=-1).flip(-2), target, mask)
    assert wrong.item() > 1.0


# ------------------------------------------------------------------------------------------------ run config


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = write_config(tmp_path / "configs", {"data": ["../data/Dataset801_X", "/abs/D2"], "out": "runs/a"})
    run = load_run_config(config)
    assert run.data == [str((tmp_path / "data" / "Dataset801_X").resolve()), str(Path("/abs/D2").resolve())]
    assert run.out == str((tmp_path / "configs" / "runs" / "a").resolve())
    assert run.prior == StageConfig(steps=400, batch_size=32, lr=5e-4), "defaults for what the file leaves out"


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        ({"out": "runs/a"}, "data"),
        ({"data": ["d"]}, "out"),
        ({"data": ["d"], "out": "o", "learning_rate": 1.0}, "learning_rate"),
        ({"data": ["d"], "out": "o", "joint": {"step": 3}}, "step"),
        (["d", "o"], "data"),
        ({"data": ["d"], "out": "o", "augment": {"zoom": [1.25, 0.8]}}, "zoom"),
        ({"data": ["d"], "out": "o", "augment": {"scale": [0.8, 1.25]}}, "scale"),
        ({"data": ["d"], "out": "o", "rec_loss": "l2"}, "rec_loss"),
        ({"data": ["d"], "out": "o", "init_modules": ["prior"]}, "init_weights"),
    ],
)
def test_bad_run_configs_raise_value_errors_naming_the_file(tmp_path: Path, settings: Any, hint: str) -> None:
    config = write_config(tmp_path, settings, "broken.yaml")
    with pytest.raises(ValueError, match="broken.yaml") as raised:
        load_run_config(config)
    assert hint in str(raised.value)


def test_toml_run_config(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('data = ["d1"]\nout = "o"\nseed = 5\n[joint]\nsteps = 7\nbatch_size = 2\n[model]\nchannels = 8\n')
    run = load_run_config(config)
    assert isinstance(run, RunConfig) and run.seed == 5 and run.model == {"channels": 8}
    assert run.joint == StageConfig(steps=7, batch_size=2) and run.data == [str((tmp_path / "d1").resolve())]
    assert run.out == str((tmp_path / "o").resolve())


def test_a_config_with_a_base_says_only_what_differs(tmp_path: Path) -> None:
    """Paths resolve against the file naming them; nested tables merge key by key; the later file wins."""
    write_config(tmp_path / "a", {"data": ["d1"], "out": "o1", "seed": 1, "threads": 2,
                                  "joint": {"steps": 9, "batch_size": 4, "lr": 0.001}})
    write_config(tmp_path / "b", {"base": "../a/run.yaml", "out": "o2", "seed": 2, "joint": {"lr": 0.0003}})
    write_config(tmp_path / "c", {"base": "../b/run.yaml", "init_weights": "w.safetensors", "seed": 3})
    run = load_run_config(tmp_path / "c" / "run.yaml")
    assert run.data == [str((tmp_path / "a" / "d1").resolve())] and run.out == str((tmp_path / "b" / "o2").resolve())
    assert run.init_weights == str((tmp_path / "c" / "w.safetensors").resolve())
    assert (run.seed, run.threads) == (3, 2) and run.joint == StageConfig(steps=9, batch_size=4, lr=0.0003)


@pytest.mark.parametrize(("base", "hint"), [("run.yaml", "itself"), ("missing.yaml", "not a file")])
def test_a_base_that_loops_or_is_missing_is_named(tmp_path: Path, base: str, hint: str) -> None:
    config = write_config(tmp_path, {"base": base, "data": ["d"], "out": "o"})
    with pytest.raises(ValueError, match=hint):
        load_run_config(config)


def test_a_base_chain_loop_is_named(tmp_path: Path) -> None:
    write_config(tmp_path, {"base": "b.yaml", "data": ["d"], "out": "o"}, "a.yaml")
    write_config(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ValueError, match="itself"):
        load_run_config(tmp_path / "a.yaml")


# ------------------------------------------------------------------------------------------------- outputs


def test_exported_model_loads_verified_with_classes_validation_cases_and_ood_threshold(
    reference: Path, data: list[Path]
) -> None:
    weights = reference / "model.safetensors"
    model, info = load_model(weights)
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_of(weights)
    saved = tensors(reference)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert info.classes == ["background", "TinyMRI/cavity", "TinyMRI/wall", "TinyCT/organ"]
    assert info.dataset_classes == {"TinyMRI": [1, 2], "TinyCT": [3]}
    assert info.config.modalities == ("TinyMRI/MRI", "TinyCT/CT") and info.config.channels == 8
    expected_val = {i.name: [c.case_id for c in split_cases(i, 0.2, 3)[1]] for i in read_datasets(data)}
    assert info.extra["validation_cases"] == expected_val and all(len(v) == 1 for v in expected_val.values())
    assert 0 < info.ood_threshold <= 1
    assert info.train_size == 16


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_log_has_one_row_per_step_of_each_stage(reference: Path) -> None:
    with open(reference / "log.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["stage", "step", "lr", "seconds", "loss", "rec", "seg", "modality", "degradation"]
    rows = read_log(reference)
    assert [(r["stage"], int(r["step"])) for r in rows] == [
        *(("prior", s) for s in range(PRIOR_STEPS)), *(("joint", s) for s in range(JOINT_STEPS))
    ]
    stages = {"prior": StageConfig(**PRIOR_STAGE), "joint": StageConfig(**JOINT_STAGE)}
    for row in rows:
        assert float(row["lr"]) == pytest.approx(learning_rate(stages[row["stage"]], int(row["step"])), rel=1e-2)
        filled = {k for k in ("rec", "seg", "modality", "degradation") if row[k]}
        assert filled == ({"modality", "degradation"} if row["stage"] == "prior" else {"rec", "seg"})
        parts = sum(float(row[k]) for k in filled)
        assert math.isfinite(float(row["loss"])) and float(row["loss"]) == pytest.approx(parts, rel=1e-4)


def test_a_checkpoint_whose_two_files_disagree_is_refused(resumed: Resumed, tmp_path: Path) -> None:
    """Tensors of one step with the JSON of another (a stop between the renames, one file copied or committed
    without the other) would resume with the wrong step and optimizer state; the pair must match."""
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        (tmp_path / name).write_bytes((resumed.run / name).read_bytes())
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    train.check_checkpoint_pair(tmp_path / "checkpoint.safetensors", meta)  # as written: accepted
    (tmp_path / "checkpoint.json").write_text(json.dumps({**meta, "step": meta["step"] - 1}))
    with pytest.raises(ValueError, match=f"checkpoint.json is at joint step {meta['step'] - 1} but "
                                         f"checkpoint.safetensors at joint step {meta['step']}"):
        train.load_checkpoint(tmp_path, torch.nn.Module())


def test_resumed_log_continues_without_repeating_steps(resumed: Resumed) -> None:
    rows = read_log(resumed.run)
    assert [(r["stage"], int(r["step"])) for r in rows] == [
        *(("prior", s) for s in range(PRIOR_STEPS)), *(("joint", s) for s in range(JOINT_STEPS))
    ]


# ------------------------------------------------------------------------------------------ DistributedDataParallel


def _ddp_rank(rank: int, settings: dict[str, Any], port: int, out: str) -> None:
    """One of two CPU (gloo) ranks, set up as torchrun would; writes a hash of its final parameters."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = train.Trainer(RunConfig(**settings))
    trainer.fit(resume=False)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters()))
    Path(out, f"rank{rank}.txt").write_text(digest.hexdigest())


def test_two_ddp_ranks_end_with_identical_parameters(data: list[Path], tmp_path: Path) -> None:
    """Each rank draws its own batches; DDP's gradient all-reduce must keep the replicas equal, in both stages."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = run_settings(data, tmp_path / "run")
    torch.multiprocessing.spawn(_ddp_rank, args=(settings, port, str(tmp_path)), nprocs=2)
    digests = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_fine_tuning_starts_from_every_exported_tensor_that_fits(reference: Path, data: list[Path], tmp_path: Path) -> None:
    settings = {**run_settings(data[:1], tmp_path / "tuned"), "init_weights": "../ref/model.safetensors"}
    (tmp_path / "ref").symlink_to(reference)
    run = load_run_config(write_config(tmp_path / "configs", settings))
    assert run.init_weights == str((tmp_path / "ref" / "model.safetensors").resolve())
    trainer = train.Trainer(run)
    assert trainer.train_set.augmentation == Augmentation(), "flips and turns only unless the config asks"
    trainer.start_from_init_weights()
    saved, own = tensors(reference), trainer.model.state_dict()
    fresh = {k for k, v in own.items() if v.shape != saved[k].shape}
    assert fresh and all(k.startswith(("seg_head.", "prior.classifier.")) for k in fresh), "one dataset: fewer classes"
    assert all(torch.equal(v, saved[k]) for k, v in own.items() if k not in fresh)


def test_a_continuation_may_not_train_on_the_cases_its_start_held_out(reference: Path, data: list[Path],
                                                                     tmp_path: Path) -> None:
    """Another `seed` draws another split, which would train on the start's held-out cases; `split_seed` keeps the
    start's split while the batches change."""
    info = read_datasets([str(data[0])])[0]
    held_out = split_cases(info, 0.2, 3)[1]
    other = next(s for s in range(4, 100) if split_cases(info, 0.2, s)[1] != held_out)
    settings = {**run_settings(data[:1], tmp_path / "tuned"), "init_weights": str(reference / "model.safetensors"),
                "seed": other}
    with pytest.raises(ValueError, match=r"held out cases that this run's split would train on \(Dataset801_TinyMRI: .*"
                                         r"set `split_seed: 3` and `val_fraction: 0.2`"):
        train.Trainer(RunConfig(**settings)).start_from_init_weights()
    kept = train.Trainer(RunConfig(**{**settings, "split_seed": 3}))
    kept.start_from_init_weights()
    assert kept.run.seed == other and kept.slices.validation_cases["Dataset801_TinyMRI"] == [c.case_id for c in held_out]
    assert kept.export() and json.loads((tmp_path / "tuned" / "model.json").read_text())["extra"]["run"]["split_seed"] == 3
    assert split_seed_of({"seed": other, "split_seed": 3}) == 3 and split_seed_of({"seed": other}) == other


def test_the_configs_augmentation_reaches_the_training_slices_only(data: list[Path], tmp_path: Path) -> None:
    settings = {**run_settings(data[:1], tmp_path / "run"), "augment": {"zoom": [0.9, 1.1], "gamma": [0.8, 1.2]}}
    trainer = train.Trainer(load_run_config(write_config(tmp_path, settings)))
    assert trainer.train_set.augmentation == Augmentation(zoom=(0.9, 1.1), gamma=(0.8, 1.2))
    assert all(not v.augment for v in trainer.slices.validation.values())


def test_the_configured_restoration_loss_is_the_one_used(data: list[Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    monkeypatch.setitem(train.REC_LOSSES, "mse", lambda a, b: used.append((a.shape, b.shape)) or F.mse_loss(a, b))
    trainer = train.Trainer(RunConfig(**{**run_settings(data[:1], tmp_path / "run"), "rec_loss": "mse"}))
    trainer.net = trainer.model
    losses = trainer.joint_step(trainer.batch("joint", 0, 2), train.step_generator(3, "joint", 0, 0))
    assert used == [((2, 1, 16, 16), (2, 1, 16, 16))] and losses["rec"] > 0


@pytest.mark.parametrize("balanced", [False, True])
def test_prior_balanced_reaches_stage_one_degradations(data: list[Path], tmp_path: Path, balanced: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    draw = train.random_degradation
    monkeypatch.setattr(train, "random_degradation", lambda *a, **k: seen.append(k["balanced"]) or draw(*a, **k))
    trainer = train.Trainer(RunConfig(**{**run_settings(data[:1], tmp_path / "run"), "prior_balanced": balanced}))
    trainer.net = trainer.model.prior
    trainer.prior_step(trainer.batch("prior", 0, 2), train.step_generator(3, "prior", 0, 0))
    assert seen and set(seen) == {balanced}


def test_native_tiles_are_crops_of_slices_degraded_at_their_own_size(data: list[Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Degradation is the identity here, so every 16-pixel tile must be a crop of a 24-pixel slice of its modality."""
    seen = []
    monkeypatch.setattr(train, "random_degradation",
                        lambda x, *a, **k: seen.append(tuple(x.shape)) or Degraded(x.clone(), 2))
    trainer = train.Trainer(RunConfig(**{**run_settings(data, tmp_path / "run"), "prior_native_fraction": 0.5}))
    dataset = trainer.train_set
    tiles = train.native_tiles(dataset, 6, 16, trainer.imaging, torch.Generator().manual_seed(0), balanced=True)
    assert seen == [(1, 1, 24, 24)] * 6 and tiles.degraded.shape == (6, 1, 16, 16) and tiles.labels.tolist() == [2] * 6
    assert torch.equal(tiles.clean, tiles.degraded), "the clean tile is cut where the degraded one is"
    for tile, mod in zip(tiles.degraded, tiles.modality):
        own = [dataset.native_slice(i)[0, 0] for i in range(len(dataset)) if dataset.sample_modality[i] == mod]
        crops = [s[top : top + 16, left : left + 16] for s in own for top in range(9) for left in range(9)]
        assert any(torch.equal(tile[0], crop) for crop in crops)


def test_dataset_weights_steer_the_training_batches(data: list[Path], tmp_path: Path) -> None:
    names = [json.loads((d / "dataset.json").read_text())["name"] for d in data]
    trainer = train.Trainer(RunConfig(**{**run_settings(data, tmp_path / "run"), "dataset_weights": {names[0]: 0}}))
    drawn = torch.cat([trainer.batch("joint", step, 8)["dataset"] for step in range(4)])
    assert set(drawn.tolist()) == {trainer.train_set.datasets.index(names[1])}
    with pytest.raises(ValueError, match="not datasets here"):
        train.Trainer(RunConfig(**{**run_settings(data, tmp_path / "typo"), "dataset_weights": {"TinyMR": 2}}))


def test_prior_native_fraction_shares_the_stage_one_batch(data: list[Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    loss = train.focal_loss
    monkeypatch.setattr(train, "focal_loss", lambda logits, *a: sizes.append(len(logits)) or loss(logits, *a))
    trainer = train.Trainer(RunConfig(**{**run_settings(data, tmp_path / "run"), "prior_native_fraction": 0.5}))
    trainer.net = trainer.model.prior
    batch = trainer.batch("prior", 0, PRIOR_STAGE["batch_size"])
    trainer.prior_step(batch, train.step_generator(3, "prior", 0, 0))
    assert len(batch["clean"]) == 2 and sizes == [PRIOR_STAGE["batch_size"]]
    with pytest.raises(ValueError, match="no training slice is larger than the patch"):
        train.Trainer(RunConfig(**{**run_settings(data, tmp_path / "big"), "prior_native_fraction": 0.5, "patch": 24}))
    with pytest.raises(ValueError, match="share of the batch"):
        RunConfig(**{**run_settings(data, tmp_path / "run"), "prior_native_fraction": 1.5})


def test_joint_native_fraction_trains_restoration_on_tiles_and_segmentation_on_slices(
    data: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = []
    monkeypatch.setitem(train.REC_LOSSES, "mse", lambda a, b: shapes.append(("rec", len(a), len(b))) or F.mse_loss(a, b))
    seg = train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", lambda logits, target, mask: shapes.append(
        ("seg", len(logits), len(target))) or seg(logits, target, mask))
    settings = {**run_settings(data, tmp_path / "run"), "rec_loss": "mse", "joint_native_fraction": 0.5}
    trainer = train.Trainer(RunConfig(**settings))
    trainer.net = trainer.model
    batch = trainer.batch("joint", 0, JOINT_STAGE["batch_size"])
    trainer.joint_step(batch, train.step_generator(3, "joint", 0, 0))
    assert len(batch["clean"]) == 1 and sorted(shapes) == [("rec", 2, 2), ("seg", 1, 1)]


def test_joint_trainable_moves_only_the_matching_weights(data: list[Path], tmp_path: Path) -> None:
    settings = {**run_settings(data[:1], tmp_path / "run"), "joint_trainable": ["*.attention.kv.*"],
                "joint": {"steps": 2, "batch_size": 2, "lr": 1e-2}}
    trainer = train.Trainer(RunConfig(**settings))
    trainer.out.mkdir(parents=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run_stage("joint", 0, None)
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".attention.kv." in k for k in moved)
    trainer.run.joint_trainable = ["no_such_layer.*"]
    with pytest.raises(ValueError, match="matches no parameter"):
        trainer.trainable("joint")


@pytest.mark.parametrize("path, other", [
    (["seg_decoder.", "seg_head."], ("restoration_trains", "rec", "seg")),
    (["decoder.0.", "rec_head."], ("segmentation_trains", "seg", "rec")),
], ids=["segmentation", "restoration"])
def test_stage_two_on_one_path_alone_skips_the_other_pass(
    data: list[Path], tmp_path: Path, path: list[str], other: tuple[str, str, str]
) -> None:
    other_trains, skipped, kept = other
    settings = {**run_settings(data[:1], tmp_path / "run"), "model": {**TINY_MODEL, "seg_branch": True},
                "joint_trainable": [prefix + "*" for prefix in path], "joint": {"steps": 2, "batch_size": 2, "lr": 1e-2}}
    trainer = train.Trainer(RunConfig(**settings))
    trainer.out.mkdir(parents=True)
    assert getattr(trainer, other_trains)()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run_stage("joint", 0, None)
    assert not getattr(trainer, other_trains)()
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith(tuple(path)) for k in moved)
    with open(trainer.out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row[skipped] == "" and row[kept] for row in rows)


def test_without_a_segmentation_branch_the_last_decoder_stage_trains_segmentation(
    data: list[Path], tmp_path: Path
) -> None:
    settings = {**run_settings(data[:1], tmp_path / "run"), "joint_trainable": ["decoder.0.*", "rec_head.*"]}
    trainer = train.Trainer(RunConfig(**settings))
    trainer.freeze_all_but(trainer.trainable("joint"))
    assert trainer.segmentation_trains()


def test_psnr_loss_is_minus_the_mean_per_slice_psnr() -> None:
    from VLDUNLib.metrics import psnr

    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 1, 32, 32, generator=generator)
    restored = (clean + torch.randn(3, 1, 1, 1, generator=generator).abs() * 0.1
                * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    expected = -float(np.mean([psnr(restored[i, 0], clean[i, 0]) for i in range(3)]))
    assert float(train.negative_psnr_loss(restored, clean)) == pytest.approx(expected, abs=1e-4)


def test_psnr_loss_weighs_a_slice_by_its_relative_error() -> None:
    """Halving either slice's error gains the same, however small that error already is (MSE: 100x apart)."""
    clean = torch.zeros(2, 1, 8, 8)
    error = torch.tensor([0.1, 0.01]).view(2, 1, 1, 1) * torch.ones(2, 1, 8, 8)
    base = train.negative_psnr_loss(clean + error, clean)
    gains = [float(base - train.negative_psnr_loss(clean + error * torch.tensor(s).view(2, 1, 1, 1), clean))
             for s in ([0.5, 1.0], [1.0, 0.5])]
    assert gains[0] == pytest.approx(gains[1], rel=1e-5) and gains[0] > 0


def test_a_slice_restored_above_the_psnr_cap_gets_no_gradient_and_the_others_theirs_unchanged() -> None:
    """An undegraded slice restored to 70 dB must not outweigh the degraded ones (the log's 1/MSE gradient)."""
    clean = torch.zeros(2, 1, 8, 8)
    restored = (torch.tensor([1e-1, 10 ** -3.5]).view(2, 1, 1, 1) * torch.ones(2, 1, 8, 8)).requires_grad_()  # 20, 70 dB
    train.negative_psnr_loss(restored, clean).backward()
    uncapped = restored.grad.clone()
    restored.grad = None
    train.negative_psnr_loss(restored, clean, cap_db=50).backward()
    assert uncapped[1].abs().sum() > 100 * uncapped[0].abs().sum()
    assert restored.grad[1].abs().sum() == 0 and torch.equal(restored.grad[0], uncapped[0])


def test_the_psnr_cap_belongs_to_the_psnr_loss() -> None:
    with pytest.raises(ValueError, match="psnr_cap_db caps"):
        train.RunConfig(data=["x"], out="y", rec_loss="l1", psnr_cap_db=50)


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("config", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.name)
def test_the_committed_recipes_load(config: Path) -> None:
    """The model card's commands reproduce its weights only if every committed recipe still parses and reads
    the developer datasets beside the repository."""
    run = load_run_config(config)
    assert run.data and all(Path(d).parent.name == "data" for d in run.data)


def test_segment_native_trains_segmentation_on_labelled_tiles_cut_where_the_image_tiles_are(
    data: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "random_degradation", lambda x, *a, **k: Degraded(x.clone(), 2))
    settings = {**run_settings(data, tmp_path / "run"), "joint_native_fraction": 0.5, "segment_native": True}
    trainer = train.Trainer(RunConfig(**settings))
    dataset = trainer.train_set
    tiles = train.native_tiles(dataset, 6, 16, trainer.imaging, torch.Generator().manual_seed(0), segmentation=True)
    assert tiles.label_maps.shape == (6, 16, 16) and tiles.class_masks.shape == (6, len(trainer.labels.keys))
    for tile, label, mask in zip(tiles.clean, tiles.label_maps, tiles.class_masks):
        pairs = [(dataset.native_slice(i)[0, 0], dataset.native_label(i), dataset.class_mask_of(i))
                 for i in range(len(dataset))]
        assert any(torch.equal(tile[0], s[t : t + 16, l : l + 16]) and torch.equal(label, m[t : t + 16, l : l + 16])
                   and torch.equal(mask, c) for s, m, c in pairs for t in range(9) for l in range(9))
    shapes = []
    seg = train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", lambda logits, target, mask: shapes.append(
        (len(logits), len(target), len(mask))) or seg(logits, target, mask))
    trainer.net = trainer.model
    batch = trainer.batch("joint", 0, JOINT_STAGE["batch_size"])
    trainer.joint_step(batch, train.step_generator(3, "joint", 0, 0))
    assert shapes == [(2, 2, 2)]  # the slice and the tile
    with pytest.raises(ValueError, match="set joint_native_fraction"):
        RunConfig(**{**run_settings(data, tmp_path / "run"), "segment_native": True})


def test_a_model_trained_with_segment_native_segments_at_the_scans_own_size(data: list[Path], tmp_path: Path) -> None:
    from VLDUNLib.inference import VolumePredictor
    from VLDUNLib.weights import load_model

    settings = {**run_settings(data, tmp_path / "run"), "joint_native_fraction": 0.5, "segment_native": True}
    weights = train_from_file(write_config(tmp_path, settings))
    predictor = VolumePredictor(device="cpu", model=load_model(weights))
    assert predictor.info.segment_native and not predictor.rescales(24, 24)
    assert VolumePredictor(device="cpu", model=load_model(train_from_file(write_config(
        tmp_path / "plain", run_settings(data, tmp_path / "plain" / "run"))))).rescales(24, 24)
