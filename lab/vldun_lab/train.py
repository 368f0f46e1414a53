"""Two-stage training of VL-DUN (`vldun train RUN.yaml`).

Stage 1 tunes the CLIP dual prior (Sec. 3.3): focal loss (Eq. 3) over the modality classes, one per
dataset/sequence, plus the image-text cross-entropy over the degradation prompts, on slices degraded
by the protocol and by the primitives. Stage 2 trains the unfolding network jointly (Sec. 3.4) with the
prior frozen: an L1 reconstruction loss plus Dice + cross-entropy segmentation losses.

Segmentation classes: one shared head over the union of every dataset's foreground classes, with each
sample's loss restricted to background + its own dataset's classes (`class_mask`). A shared head keeps
one forward pass and one set of features for all anatomy, and no per-dataset parameters that a small
dataset (one abdominal CT) could not train; at inference the detected modality selects the dataset's
classes. Classes absent from a sample's dataset are masked out, never taught as background.

Clean samples (`clean_fraction`) are the "none" degradation class of stage 1 and identity targets of stage 2, so
the model can say that a scan needs no restoration, and leaves it as it is.

Reproducibility: every random draw of step s (batch indices, degradations) comes from a generator
seeded by (seed, stage, s, rank), and checkpoints hold the model, the optimizer state and the step,
so a resumed run continues exactly as an uninterrupted one, on this or another machine of the same kind
(`--session-minutes` pauses at a checkpoint; a resume with other settings is refused). Each checkpoint and
the export record every session's machine, code commit and wall time. Multi-GPU runs use `torchrun`
(DistributedDataParallel); each rank draws its own batches (tested with two CPU ranks over gloo).

Data: dataset folders in the nnU-Net layout, or one file made from them by `vldun prepare` (prepared.py),
which trains where the folders and SimpleITK are not (a GPU machine).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from VLDUNLib.config import make_config
from VLDUNLib.config import NO_DEGRADATION
from VLDUNLib.degradations import DEGRADATIONS, Degraded, random_degradation
from VLDUNLib.letterbox import resize_images, resize_slices
from VLDUNLib.network import build_model
from VLDUNLib.priors import focal_loss, image_text_loss
from VLDUNLib import ssm
from VLDUNLib.ssm import cuda_scan_available, missing_cuda_scan
from VLDUNLib.weights import ModelInfo, read_model_info, rewrite_info, save_weights

from . import cpu_scan, prepared
from .augmentation import Augmentation
from . import baseline  # noqa: F401 (registers architecture "unet")
from .slices import SliceDataset
from .splits import split_seed_of
from .warmstart import load_matching_weights


@dataclass
class StageConfig:
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50


def negative_psnr_loss(restored: torch.Tensor, clean: torch.Tensor, cap_db: float | None = None) -> torch.Tensor:
    """Minus the mean per-slice PSNR (data range 1), the figure evaluation reports; a slice above `cap_db` counts as
    `cap_db` and gets no gradient.

    A batch MSE is dominated by the slices with the largest errors: undersampled MRI's MSE is 5-30x that of
    sparse-view CT, so CT gets a small share of the gradient. The log makes every slice's share its relative
    error change, as a per-case PSNR average weighs it. But the log's gradient grows as 1/MSE without bound: an
    undegraded slice restored to 70 dB outweighs the rest of the batch, hence the cap.
    """
    mse = (restored - clean).pow(2).flatten(1).mean(1)
    floor = 10.0 ** (-cap_db / 10) if cap_db is not None else 1e-10
    return 10 * torch.log10(mse.clamp_min(floor)).mean()


REC_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "psnr": negative_psnr_loss}


@dataclass
class RunConfig:
    """One training run; written beside its outputs so every model says how it was made."""

    data: list[str]
    """Dataset folders (nnU-Net layout), or one `.vldun` file that `vldun prepare` made from them."""
    out: str
    preset: str = "compact"
    ablation: str = "full"
    architecture: str = "vldun"
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's config (e.g. `channels: 32` for the U-Net baseline)."""
    seed: int = 0
    split_seed: int | None = None
    """Seed of the per-dataset train/validation split; None: `seed`. A continuation that draws new batches (another
    `seed`) names its start's seed here, so that the start's held-out cases stay held out (`check_held_out`)."""
    patch: int = 128
    val_fraction: float = 0.2
    prior: StageConfig = field(default_factory=lambda: StageConfig(steps=400, batch_size=32, lr=5e-4))
    joint: StageConfig = field(default_factory=lambda: StageConfig(steps=2000, batch_size=8, lr=1e-3))
    augment: dict[str, Any] = field(default_factory=dict)
    """Augmentation beyond flips and quarter turns (`augmentation.Augmentation` fields: zoom, rotation_degrees,
    gamma, window, probability); empty: flips and turns only."""
    dataset_weights: dict[str, float] = field(default_factory=dict)
    """Share of the batches each dataset gets, by its short name (the `name` of its dataset.json), relative to 1
    for a dataset not named: `{COVID19CT: 2}` draws COVID-19 slices twice as often as each other dataset. Empty:
    every dataset equally often, whatever its size."""
    primitive_fraction: float = 0.25
    """Share of stage-2 batches degraded by a primitive (noise, blur, ...) instead of the undersampling protocol."""
    clean_fraction: float = 0.0
    """Share of training samples left undegraded. Stage 1 labels them "none" (the model's `degradations` must list
    it), so a clean scan is reported as "no degradation detected"; stage 2 learns to leave them unchanged."""
    prior_balanced: bool = False
    """Stage 1 draws each of a modality's five degradations equally often (`random_degradation(balanced=True)`);
    false: the protocol half the time, as runs before stop 23 were trained."""
    prior_native_fraction: float = 0.0
    """Share of each stage-1 batch that is tiles of training slices degraded at their own size (`native_tiles`),
    what the prior reads of a scan in Slicer (`inference.prior_tiles`); the rest is slices at patch size. Needs the
    dataset folders as `data:`. 0: patch size only, as runs before stop 24 were trained."""
    joint_native_fraction: float = 0.0
    """The same for stage 2: that share of each batch is tiles degraded at their own size, with their clean tiles, and
    trains restoration only (Slicer restores at the scan's own size but segments at patch size)."""
    segment_native: bool = False
    """Stage 2's native tiles carry their label maps and train segmentation too, and the exported model segments
    each slice at its own size (`ModelInfo.segment_native`): a 428-pixel ACDC slice is no longer shrunk 3.3x
    before its thin myocardium is segmented. Needs joint_native_fraction above 0."""
    joint_trainable: list[str] | None = None
    """Stage 2 trains only the network parameters whose names match one of these `fnmatch` patterns, e.g.
    `["*.attention.kv.*"]`: after a prior re-tune, only the projections that read its tokens follow it, and the
    trunk and heads keep what they learned. None: the whole network."""
    rec_weight: float = 1.0
    rec_loss: str = "l1"
    """Restoration loss: "l1", "mse" or "psnr" (`negative_psnr_loss`). Under L1 a zero residual is optimal wherever
    the features cannot yet predict it, and each pixel's gradient is a sign that cancels out; MSE pulls towards the
    mean, which PSNR measures; "psnr" also weighs CT's small errors as much as MRI's (MODEL_CARD.md)."""
    psnr_cap_db: float | None = None
    """With rec_loss "psnr", slices restored above this PSNR add nothing to the loss. Uncapped, the undegraded slices
    (`clean_fraction`) restored to 55-72 dB gave 90-98 % of the restoration gradient's norm, and the global gradient
    clipping then shrank every other gradient of those steps 15-85x (history, 2026-12-08). None: uncapped, as
    the weights shipped on 2026-12-07 were trained."""
    seg_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    checkpoint_every: int = 100
    time_limit_minutes: float | None = None
    """Stop stage 2 after this wall time (equal-compute comparisons); the learning rate decays over it and the
    model is exported as usual. A time-limited run is not bit-reproducible (the schedule follows the clock)."""
    threads: int | None = None
    clip_weights: str | None = None
    init_weights: str | None = None
    """A VLDUN .safetensors to start from (fine-tuning): tensors whose name and shape match are copied."""
    init_modules: list[str] | None = None
    """With `init_weights`, copy only these top-level parts of the model ([prior]: stage 2 from scratch on a tuned
    prior, so that a GPU run spends its minutes on the network)."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on the CPU, where bf16 is slower here)."""
    gpu: dict[str, Any] = field(default_factory=dict)
    """Settings laid over the others when the run trains on CUDA (larger batches): one recipe for both machines.
    A checkpoint records which settings it was trained with, and a resume on the other kind of machine is refused."""
    calibrate_ood: bool = False
    """After export, fit the unknown-scan statistics on the training datasets (`calibrate.calibrate`, the default
    protocol) and write them into the model's JSON, as `vldun calibrate-ood --write` does. Needs the dataset folders."""

    @property
    def split(self) -> int:
        """The seed the train/validation split is drawn with."""
        return split_seed_of(vars(self))

    def __post_init__(self) -> None:
        if isinstance(self.prior, dict):
            self.prior = StageConfig(**self.prior)
        if isinstance(self.joint, dict):
            self.joint = StageConfig(**self.joint)
        Augmentation.from_config(self.augment)
        if self.init_modules is not None and not self.init_weights:
            raise ValueError("init_modules names parts of init_weights; add `init_weights:` (a VLDUN .safetensors).")
        for name in ("prior_native_fraction", "joint_native_fraction", "clean_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share of the batch, 0 to 1; got {getattr(self, name)}")
        if self.rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {sorted(REC_LOSSES)}; got {self.rec_loss!r}")
        if self.psnr_cap_db is not None and self.rec_loss != "psnr":
            raise ValueError(f"psnr_cap_db caps the \"psnr\" restoration loss; rec_loss is {self.rec_loss!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads is a number of CPU threads, at least 1; got {self.threads}")
        if self.segment_native and not self.joint_native_fraction:
            raise ValueError("segment_native trains segmentation on stage 2's native tiles; set joint_native_fraction "
                             "above 0 (e.g. 0.25)")


def read_run_settings(path: Path, children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's settings with its paths resolved against its folder, laid over those of its `base:` file.

    A continuation run repeats its predecessor but for a few keys; `base:` names that predecessor's config, so the
    difference is all the file says. Nested tables (`joint:`, `model:`) are merged key by key."""
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(text)
    else:
        raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a run config is a mapping with at least `data:` (dataset folders or a prepared "
                         ".vldun file) and `out:` (run folder).")
    folder = path.parent
    if "data" in raw:
        raw["data"] = [str((folder / d).resolve()) for d in raw["data"]]
    for key in ("out", "init_weights"):
        if raw.get(key):
            raw[key] = str((folder / raw[key]).resolve())
    parent = raw.pop("base", None)
    if parent is None:
        return raw
    parent_path = (folder / parent).resolve()
    if parent_path in (*children, path.resolve()):
        raise ValueError(f"{path}: `base: {parent}` leads back to itself; point it at another run's config.")
    if not parent_path.is_file():
        raise ValueError(f"{path}: `base: {parent}` is not a file; name a run config relative to this one's folder.")
    return merge_settings(read_run_settings(parent_path, (*children, path.resolve())), raw)


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` laid over `base`: its nested mappings key by key, everything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            value = merge_settings(base[key], value)
        merged[key] = value
    return merged


def load_run_config(path: Path, out: str | Path | None = None, cuda: bool | None = None) -> RunConfig:
    """A run config from YAML (or TOML), with its `base:` chain; relative paths are relative to the file naming them.

    `out` replaces the file's run folder (a run of the recipe elsewhere); on CUDA (`cuda`, default: whether torch
    sees a GPU) the file's `gpu:` settings are laid over the rest."""
    raw = read_run_settings(path)
    if out is not None:
        raw["out"] = str(Path(out).resolve())
    if "data" not in raw or "out" not in raw:
        raise ValueError(f"{path}: a run config needs at least `data:` (dataset folders or a prepared .vldun file) "
                         "and `out:` (run folder).")
    gpu = raw.get("gpu") or {}
    if not isinstance(gpu, dict) or {"data", "out", "gpu"} & set(gpu):
        raise ValueError(f"{path}: `gpu:` is a mapping of settings for a CUDA run (e.g. joint: {{batch_size: 64}}), "
                         "not data, out or gpu")
    if gpu and (torch.cuda.is_available() if cuda is None else cuda):
        raw = merge_settings(raw, gpu)
    try:
        return RunConfig(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def check_held_out(init_weights: str, validation_cases: dict[str, list[str]]) -> None:
    """Refuse to train on cases that the starting model held out: they would no longer be held out for anything
    trained from it, and its evaluation would report training cases. (A continuation with another `seed` and so
    another split reported held-out ACDC Dice 0.76 and BraTS whole tumour 0.70 against 0.65 and 0.06; MODEL_CARD.md.)"""
    _, info = read_model_info(init_weights)
    held_out = info.extra.get("validation_cases") or {}
    leaked = {name: sorted(set(cases) - set(validation_cases[name])) for name, cases in held_out.items()
              if name in validation_cases}
    leaked = {name: cases for name, cases in leaked.items() if cases}
    if leaked:
        start = info.extra.get("run", {})
        seed = split_seed_of(start)
        shown = "; ".join(f"{name}: {', '.join(cases[:3])}{' ...' if len(cases) > 3 else ''}"
                          for name, cases in leaked.items())
        raise ValueError(
            f"init_weights {Path(init_weights).name} held out cases that this run's split would train on ({shown}). "
            f"Keep its split: set `split_seed: {seed}` and `val_fraction: {start.get('val_fraction', 0.2)}` in the run "
            "config (a different `seed` still draws new batches)."
        )


def step_generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    """All randomness of one step: independent of what ran before, so resuming is exact.

    The seed is a SHA-256 of the step's identity, not Python's ``hash``, which is salted per process and
    would give a resumed run (a new process) other batches than the uninterrupted one.
    """
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def learning_rate(stage: StageConfig, step: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to 1 % of the peak.

    The decay follows the larger of the step fraction and `time_fraction` (elapsed / time limit), so a
    run cut by a wall-time budget still ends on a fully decayed learning rate.
    """
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    progress = max((step - stage.warmup) / max(1, stage.steps - stage.warmup), time_fraction)
    return stage.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


CLEAN = len(DEGRADATIONS)
"""Label of a sample left undegraded (`clean_fraction`); `Trainer.degradation_labels` maps it to "none"."""


def degrade_or_keep(
    x: torch.Tensor, kind: str, generator: torch.Generator, primitives: bool, balanced: bool, clean_fraction: float
) -> Degraded:
    """`random_degradation`, or with probability `clean_fraction` the input itself labelled `CLEAN`.

    Nothing is drawn for the choice when `clean_fraction` is 0, so runs without clean samples draw as before."""
    if clean_fraction > 0 and torch.rand((), generator=generator).item() < clean_fraction:
        return Degraded(x, CLEAN)  # callers copy it into their batch
    return random_degradation(x, kind, generator, primitives=primitives, balanced=balanced)


def degrade_batch(
    clean: torch.Tensor,
    imaging: list[str],
    generator: torch.Generator,
    primitives: bool,
    chunk: int = 4,
    balanced: bool = False,
    clean_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade a batch in small chunks of one imaging type each, so one batch mixes several degradations; a chunk
    stays clean with probability `clean_fraction` (label `CLEAN`).

    Runs on the batch's device (the training GPU: a 128-slice batch takes 100-180 ms on 2 CPU threads, longer
    than the H100's whole training step); the draws come from the CPU generator, so a GPU run degrades as a
    CPU run does, to float rounding.
    """
    degraded = torch.empty_like(clean)
    labels = torch.empty(len(clean), dtype=torch.long)
    for kind in sorted(set(imaging)):
        idx = [i for i, k in enumerate(imaging) if k == kind]
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            out = degrade_or_keep(clean[part], kind, generator, primitives, balanced, clean_fraction)
            degraded[part] = out.image
            labels[part] = out.label
    return degraded, labels


class NativeTiles(NamedTuple):
    """What `native_tiles` gives: (N, 1, P, P) degraded and clean tiles, degradation labels, modality classes, and
    with `segmentation` the (N, P, P) label tiles and (N, C) class masks of their datasets."""

    degraded: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    modality: torch.Tensor
    label_maps: torch.Tensor | None = None
    class_masks: torch.Tensor | None = None


def native_tiles(
    dataset: SliceDataset, count: int, size: int, imaging: list[str], generator: torch.Generator,
    primitives: bool = True, balanced: bool = False, weights: Mapping[str, float] | None = None,
    clean_fraction: float = 0.0, segmentation: bool = False,
) -> NativeTiles:
    """``count`` inputs (N, 1, size, size) as a scan at its own size gives them, their clean tiles, degradation labels
    and modality classes: a training slice larger than ``size`` degraded whole at its own size
    (`random_degradation(primitives, balanced)`), then one size x size tile of both at a random place, letterboxed as
    `inference.prior_tiles` does.

    At patch size a 487-pixel CT slice is shrunk 4x before it is degraded; in Slicer its 60 spokes, noise and blur
    act on the full grid and the prior reads 128-pixel tiles of it, a scale it never trained on (held out,
    COVID-19's sparse-view was read as blur on 7 of 10 trials).
    """
    indices = dataset.native_indices(count, size, generator, weights).tolist()
    degraded, clean, labels, label_maps = [], [], [], []
    for index in indices:
        kind = imaging[int(dataset.sample_modality[index])]
        own = dataset.native_slice(index)
        out = degrade_or_keep(own, kind, generator, primitives, balanced, clean_fraction)
        height, width = own.shape[-2:]
        top = int(torch.randint(0, max(1, height - size + 1), (), generator=generator))
        left = int(torch.randint(0, max(1, width - size + 1), (), generator=generator))
        for image, tiles in ((out.image, degraded), (own, clean)):
            tiles.append(resize_images(image[..., top : top + size, left : left + size], size))
        labels.append(out.label)
        if segmentation:
            tile = dataset.native_label(index)[None, top : top + size, left : left + size].numpy()
            label_maps.append(torch.from_numpy(resize_slices(tile, size, "label")).to(torch.int64))
    tiles = NativeTiles(torch.cat(degraded), torch.cat(clean), torch.tensor(labels, dtype=torch.long),
                        dataset.sample_modality[indices])
    if not segmentation:
        return tiles
    masks = torch.stack([dataset.class_mask_of(i) for i in indices])
    return tiles._replace(label_maps=torch.cat(label_maps), class_masks=masks)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over background and the sample's own dataset classes only."""
    masked = logits.float().masked_fill(~class_mask[:, :, None, None], -1e4)
    ce = F.cross_entropy(masked, target)
    probs = masked.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((2, 3))
    denom = probs.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2 * inter + 1) / (denom + 1)
    fg = class_mask.clone()
    fg[:, 0] = False
    return ce + (1 - dice)[fg].mean()


def degradation_table(names: Sequence[str], clean_fraction: float) -> torch.Tensor:
    """The model's degradation index of each training label: `DEGRADATIONS` in order, then `CLEAN` ("none")."""
    missing = [d for d in DEGRADATIONS if d not in names]
    if missing:
        raise ValueError(f"model.degradations lacks {missing}: training draws every one of {list(DEGRADATIONS)}")
    if clean_fraction > 0 and NO_DEGRADATION not in names:
        raise ValueError(f"clean_fraction {clean_fraction} needs {NO_DEGRADATION!r} in model.degradations, the class "
                         "that clean slices are taught as; add it, or set clean_fraction: 0")
    none = names.index(NO_DEGRADATION) if NO_DEGRADATION in names else -1
    return torch.tensor([names.index(d) for d in DEGRADATIONS] + [none])


RESUME_FREE = ("out", "threads", "checkpoint_every")
"""Settings a resumed run may change: they move no weight."""


def resume_identity(run: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must have been trained with to be continued: all but `RESUME_FREE`, with data
    and start weights by name, so the same run resumes on another machine with other paths."""
    settings = {k: v for k, v in asdict(run).items() if k not in RESUME_FREE}
    settings["data"] = [Path(d).name for d in run.data]
    settings["init_weights"] = Path(run.init_weights).name if run.init_weights else None
    return json.loads(json.dumps(settings))


def check_resumable(state: Mapping[str, Any], run: RunConfig, out: Path) -> None:
    """Refuse to continue a checkpoint that other settings (another recipe, a GPU block, a changed file) trained."""
    recorded = state.get("run")
    if recorded is None:
        return
    now = resume_identity(run)
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(RunConfig)}
    defaults = json.loads(json.dumps({k: v for k, v in defaults.items() if v is not MISSING}, default=asdict))
    # a setting added to RunConfig after the checkpoint was written counts as unchanged while it has its default
    changed = sorted(k for k in set(recorded) | set(now)
                     if recorded.get(k, defaults.get(k)) != now.get(k, defaults.get(k)))
    if changed:
        raise ValueError(f"{out} holds a checkpoint trained with other settings: {', '.join(changed)} changed (a "
                         "`gpu:` block applies on CUDA only). Resume it with the config and machine kind it started with "
                         "(its run.json), or start the new settings in another --out")


def machine() -> str:
    """The hardware a part of the run trained on, as the model card names it."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} CPUs"


def scan_backend(device: torch.device) -> str:
    """Which selective scan trains on ``device``: on a CPU the compiled kernel, built now (`cpu_scan`), where it builds."""
    if device.type == "cpu":
        return cpu_scan.install()
    return "mamba-ssm CUDA kernel" if cuda_scan_available() else "PyTorch"


def code_version() -> str:
    """The commit of the code that trains, "+changes" when the model, the lab or the recipes differ from it in the
    work tree; "unknown" outside git."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "VLDUN/VLDUNLib", "lab/vldun_lab", "recipes")
        return git("rev-parse", "--short=12", "HEAD") + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_table(recipe: str, sessions: list[dict[str, Any]]) -> str:
    """Markdown for the model card: each session of the run, where it started and ended, on what and with which code.

    A session whose code was restated after the fact (`restated`: what was recorded and why the commit shown is
    the code it ran) says so in its row, so the card never hides a correction."""
    lines = [f"Trained by `vldun train {recipe}` in {len(sessions)} session(s):", "",
             "| started (UTC) | machine | scan | code | from | to | minutes |", "|---|---|---|---|---|---|---|"]
    for s in sessions:
        start, end = (f"{stage} {step}" for stage, step in (s["from"], s.get("to", s["from"])))
        code = f"{s['code']} (restated: {s['restated']})" if s.get("restated") else s["code"]
        lines.append(f"| {s['started']} | {s['machine']} | {s.get('scan', 'PyTorch')} | {code} | {start} | {end} "
                     f"| {s['seconds'] / 60:.1f} |")
    total = sum(s["seconds"] for s in sessions) / 3600
    return "\n".join([*lines, "", f"Total: {total:.2f} hours.", ""])


class SessionOver(Exception):
    """The session's minutes are spent, or a stop was asked for; the checkpoint just written continues the run
    (`--resume`)."""


@contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM or a first Ctrl-C asks `trainer` to pause after the step under way, checkpointed, instead of dying
    with up to `checkpoint_every` steps lost; a second one acts as usual. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def request_stop(number: int, _frame: object) -> None:
        trainer.stop_requested = signal.Signals(number).name
        for s, handler in previous.items():
            signal.signal(s, handler)
        print(f"\n{trainer.stop_requested}: pausing after this step (a second one stops at once)", flush=True)

    for s in signals:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Trainer:
    """Runs both stages with checkpoints, a progress bar and a CSV log; exports safetensors at the end."""

    def __init__(self, run: RunConfig, session_minutes: float | None = None, recipe: str = "") -> None:
        self.run = run
        self.recipe = recipe
        self.out = Path(run.out)
        self.deadline = time.monotonic() + 60 * session_minutes if session_minutes else None
        self.stop_requested = ""
        """The signal that asked the run to pause (`stop_on_signals`), else empty."""
        self.sessions: list[dict[str, Any]] = []
        self.rank, self.world = init_distributed()
        self.device = torch.device(f"cuda:{self.rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu")
        if run.threads:
            torch.set_num_threads(run.threads)
        if self.rank == 0 and (advice := missing_cuda_scan(self.device)):
            print(advice)
        self.scan = scan_backend(self.device)
        native = run.prior_native_fraction > 0 or run.joint_native_fraction > 0
        self.slices = prepared.for_run(run.data, run.patch, run.val_fraction, run.split, native, run.segment_native)
        self.modalities, self.labels, self.train_set = self.slices.modalities, self.slices.labels, self.slices.train
        if native and not len(self.train_set.native_indices(1, run.patch)):
            raise ValueError(f"prior/joint_native_fraction: no training slice is larger than the patch ({run.patch} "
                             "px), so its tiles would be the patch-size slices: set both to 0")
        self.train_set.dataset_shares(run.dataset_weights)  # a misspelt name fails here, before any step
        self.train_set.augmentation = Augmentation.from_config(run.augment)
        torch.manual_seed(run.seed)
        self.config = make_config(
            run.preset, run.ablation, **{
                **run.model, "architecture": run.architecture, "num_classes": len(self.labels.keys),
                "modalities": tuple(m.key for m in self.modalities),
            },
        )
        self.model = build_model(self.config, clip_weights=run.clip_weights).to(self.device)
        self.imaging = [m.imaging for m in self.modalities]
        if self.model.prior is not None:
            self.degradation_labels = degradation_table(self.config.degradations, run.clean_fraction)

    def native_count(self, stage: str) -> int:
        """Samples per batch of a stage taken as `native_tiles`."""
        if stage == "prior":
            return round(self.run.prior_native_fraction * self.run.prior.batch_size)
        return round(self.run.joint_native_fraction * self.run.joint.batch_size)

    def batch(self, stage: str, step: int, size: int) -> dict[str, torch.Tensor]:
        generator = step_generator(self.run.seed, stage, step, self.rank)
        size -= self.native_count(stage)
        indices = self.train_set.balanced_indices(size, generator, self.run.dataset_weights)
        items = [self.train_set.item(i, generator) for i in indices]
        return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}

    def stages(self) -> list[str]:
        return (["prior"] if self.model.prior is not None else []) + ["joint"]

    def trainable(self, stage: str) -> list[nn.Parameter]:
        if stage == "prior":
            return [p for p in self.model.prior.parameters() if p.requires_grad]
        prior = {id(p) for p in self.model.prior.parameters()} if self.model.prior is not None else set()
        named = [(name, p) for name, p in self.model.named_parameters() if id(p) not in prior]
        patterns = self.run.joint_trainable
        if patterns is None:
            return [p for _, p in named]
        chosen = [p for name, p in named if any(fnmatch(name, pattern) for pattern in patterns)]
        if not chosen:
            raise ValueError(f"joint_trainable {patterns} matches no parameter of the network; names look like "
                             f"{[name for name, _ in named[:3]]}")
        return chosen

    def restoration_trains(self) -> bool:
        """Whether the restoration loss reaches a weight that trains; if not, the restoration pass is skipped."""
        return any(p.requires_grad for _, p in self.model.restoration_parameters())

    def segmentation_trains(self) -> bool:
        """Whether the segmentation loss reaches a weight that trains; if not, the segmentation pass is skipped."""
        return any(p.requires_grad for _, p in self.model.segmentation_parameters())

    def freeze_all_but(self, params: list[nn.Parameter]) -> None:
        """Stage 2 with `joint_trainable`: the other weights get no gradient, so backward skips their work."""
        chosen = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)

    def prior_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        imaging = [self.imaging[m] for m in batch["modality"].tolist()]
        degraded, deg_labels = degrade_batch(
            batch["clean"].to(self.device), imaging, generator, primitives=True, balanced=self.run.prior_balanced,
            clean_fraction=self.run.clean_fraction,
        )
        modality = batch["modality"]
        if count := self.native_count("prior"):
            tiles = native_tiles(self.train_set, count, self.run.patch, self.imaging, generator,
                                 balanced=self.run.prior_balanced, weights=self.run.dataset_weights,
                                 clean_fraction=self.run.clean_fraction)
            degraded = torch.cat([degraded, tiles.degraded.to(self.device)])
            deg_labels, modality = torch.cat([deg_labels, tiles.labels]), torch.cat([modality, tiles.modality])
        deg_labels = self.degradation_labels[deg_labels]
        out = self.net(degraded)
        mod = focal_loss(out.modality_logits, modality.to(self.device), self.run.focal_alpha, self.run.focal_gamma)
        deg = image_text_loss(out.degradation_logits, deg_labels.to(self.device))
        return {"loss": mod + deg, "modality": mod, "degradation": deg}

    def joint_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        imaging = [self.imaging[m] for m in batch["modality"].tolist()]
        primitives = torch.rand((), generator=generator).item() < self.run.primitive_fraction
        clean = batch["clean"].to(self.device)
        degraded, _ = degrade_batch(clean, imaging, generator, primitives=primitives,
                                    clean_fraction=self.run.clean_fraction)
        labelled = len(clean)
        target, class_mask = batch["label"], batch["class_mask"]
        if count := self.native_count("joint"):
            tiles = native_tiles(self.train_set, count, self.run.patch, self.imaging, generator, primitives,
                                 weights=self.run.dataset_weights, clean_fraction=self.run.clean_fraction,
                                 segmentation=self.run.segment_native)
            degraded = torch.cat([degraded, tiles.degraded.to(self.device)])
            clean = torch.cat([clean, tiles.clean.to(self.device)])
            if self.run.segment_native:
                labelled += count
                target, class_mask = torch.cat([target, tiles.label_maps]), torch.cat([class_mask, tiles.class_masks])
        with torch.no_grad():
            prior = self.model.compute_prior(degraded)
        with autocast(self.device, self.run.amp):
            out = self.net(degraded, prior, restore=self.restoration_trains(), segment=self.segmentation_trains())
        losses: dict[str, torch.Tensor] = {}
        if out.restored is not None:
            losses["rec"] = self.run.rec_weight * self.restoration_loss(out.restored.float(), clean)
        if out.seg_logits is not None:
            losses["seg"] = self.run.seg_weight * segmentation_loss(
                out.seg_logits[:labelled], target.to(self.device), class_mask.to(self.device)
            )
        losses["loss"] = sum(losses.values())
        return losses

    def restoration_loss(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        if self.run.rec_loss == "psnr":
            return negative_psnr_loss(restored, clean, self.run.psnr_cap_db)
        return REC_LOSSES[self.run.rec_loss](restored, clean)

    def fit(self, resume: bool) -> Path | None:
        """Train (or continue) both stages and export; None when the session's minutes ran out first."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            state = load_checkpoint(self.out, self.model)
            check_resumable(state, self.run, self.out)
            self.sessions = list(state.get("sessions", []))
        else:
            if (self.out / "checkpoint.json").exists():
                raise ValueError(f"{self.out} already holds a checkpoint: continue it with --resume, or give another "
                                 "--out (a fresh start would overwrite it)")
            self.start_from_init_weights()
            state = {"stage": None, "step": 0}
        (self.out / "run.json").write_text(json.dumps(asdict(self.run), indent=2) + "\n")
        self.begin_session(state["stage"] or self.stages()[0], state["step"])
        try:
            with stop_on_signals(self):
                for stage in self.stages():
                    done = state["stage"] is not None and self.stages().index(stage) < self.stages().index(state["stage"])
                    if done:
                        continue
                    first = state["step"] if state["stage"] == stage else 0
                    self.run_stage(stage, first, state if state["stage"] == stage else None)
        except SessionOver as pause:
            why = f"stopped by {self.stop_requested}" if self.stop_requested else "the session's minutes are spent"
            print(f"Paused at {pause}: {why}. Continue with `vldun train CONFIG --resume` (checkpoint in {self.out}).")
            return None
        return self.export()

    def begin_session(self, stage: str, step: int) -> None:
        """Start this process's entry of the run's sessions: where it began, on what machine, with which code."""
        self.sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "code": code_version(), "scan": self.scan, "from": [stage, step], "seconds": 0.0})
        self.session_start = time.monotonic()

    def checkpoint(self, optimizer: torch.optim.Optimizer, stage: str, step: int) -> None:
        """Save the checkpoint with what trained it: the run's settings and each session's machine, code and time."""
        if not self.sessions:  # a stage run on its own, outside fit
            self.begin_session(stage, 0)
        self.sessions[-1].update(to=[stage, step], seconds=round(time.monotonic() - self.session_start, 1))
        save_checkpoint(self.out, self.model, optimizer, stage, step,
                        {"run": resume_identity(self.run), "sessions": self.sessions})

    def start_from_init_weights(self) -> None:
        """Fine-tuning start; a resumed run skips it (its checkpoint has every tensor), so the file may be gone."""
        if self.run.init_weights:
            check_held_out(self.run.init_weights, self.slices.validation_cases)
            fresh = load_matching_weights(self.model, self.run.init_weights, self.run.init_modules)
            shown = fresh if len(fresh) <= 20 else f"all of {sorted({key.split('.')[0] for key in fresh})}"
            print(f"Started from {self.run.init_weights}; {len(fresh)} tensors kept their fresh initialisation: {shown}")

    def start_stage(self, stage: str) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        """The stage's trainable weights and their optimizer, the network in training mode."""
        cfg = self.run.prior if stage == "prior" else self.run.joint
        params = self.trainable(stage)
        if stage == "joint" and self.run.joint_trainable is not None:
            self.freeze_all_but(params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        module = self.model.prior if stage == "prior" else self.model
        self.net = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True) if self.world > 1 else module
        self.model.train()
        return params, optimizer

    def train_step(self, stage: str, step: int, params: list[nn.Parameter],
                   optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One optimiser step of ``stage`` on its batch ``step`` (the batch and degradations follow from the step)."""
        cfg = self.run.prior if stage == "prior" else self.run.joint
        step_fn = self.prior_step if stage == "prior" else self.joint_step
        generator = step_generator(self.run.seed, stage, step, self.rank)
        losses = step_fn(self.batch(stage, step, cfg.batch_size), generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    def run_stage(self, stage: str, first: int, resumed: dict[str, Any] | None) -> None:
        cfg = self.run.prior if stage == "prior" else self.run.joint
        params, optimizer = self.start_stage(stage)
        if resumed is not None:
            load_optimizer(self.out, optimizer)
        log = CsvLog(self.out / "log.csv", self.rank == 0)
        bar = tqdm(range(first, cfg.steps), desc=f"stage {stage}", disable=self.rank != 0, initial=first, total=cfg.steps)
        limit = 60 * self.run.time_limit_minutes if stage == "joint" and self.run.time_limit_minutes else None
        stage_start = time.monotonic()
        for step in bar:
            elapsed = time.monotonic() - stage_start
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, elapsed / limit if limit else 0.0)
            values = self.train_step(stage, step, params, optimizer)
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
            log.write(stage, step, optimizer.param_groups[0]["lr"], values)
            last = step + 1 == cfg.steps
            over_time = limit is not None and time.monotonic() - stage_start > limit
            ended = bool(self.stop_requested) or (self.deadline is not None and time.monotonic() > self.deadline)
            paused = ended and not (last or over_time)
            if self.rank == 0 and ((step + 1) % self.run.checkpoint_every == 0 or last or over_time or paused):
                self.checkpoint(optimizer, stage, step + 1)
            if over_time:
                break
            if paused:
                raise SessionOver(f"stage {stage}, step {step + 1} of {cfg.steps}")
        self.model.eval()

    def time_steps(self, steps: int) -> dict[str, float]:
        """Seconds per step of each stage, the mean of ``steps`` steps after one untimed step (nothing is saved).

        On a CPU the joint stage is timed with the compiled scan and again with the PyTorch scan when the kernel
        built, so the gain is measured on the machine that trains; the prior has no scan.
        """
        timings: dict[str, float] = {}
        scanned = any(isinstance(m, ssm.BiMamba2D | ssm.MambaBlock) for m in self.model.modules())
        scans = [self.scan, "PyTorch"] if self.scan == "compiled CPU kernel" else [self.scan]
        for stage in self.stages():
            for scan in scans if stage == "joint" and scanned else [None]:
                if scan == "PyTorch":
                    ssm.use_cpu_scan(None)
                params, optimizer = self.start_stage(stage)
                self.train_step(stage, 0, params, optimizer)
                start = time.perf_counter()
                for step in range(1, steps + 1):
                    self.train_step(stage, step, params, optimizer)
                timings[f"{stage} ({scan} scan)" if scan else stage] = (time.perf_counter() - start) / steps
        return timings

    def export(self, path: Path | None = None, interim: dict[str, Any] | None = None) -> Path:
        """The model as weights (safetensors + JSON) at `path` (default: the run's model.safetensors, with its
        provenance.md); `interim` marks weights exported from a checkpoint of an unfinished run."""
        info = ModelInfo(
            config=self.config,
            classes=list(self.labels.keys),
            dataset_classes={k: list(v) for k, v in self.labels.dataset_classes.items()},
            ood_threshold=self.calibrate_ood_threshold(),
            train_size=self.run.patch,
            modality_names={m.key: m.display for m in self.modalities},
            tasks=self.labels.tasks(),
            segment_native=self.run.segment_native,
            extra={
                "run": resume_identity(self.run),  # the settings, datasets by name: no path of this machine
                "datasets": list(self.slices.validation_cases),
                "validation_cases": self.slices.validation_cases,
                "training_cases": self.slices.training_cases,
                "recipe": self.recipe,
                "sessions": self.sessions,
                **({"interim": interim} if interim else {}),
            },
        )
        final = path is None
        path = self.out / "model.safetensors" if final else path
        if self.rank == 0:
            save_weights(self.model, info, path)
            if final:
                (self.out / "provenance.md").write_text(provenance_table(self.recipe, self.sessions))
        return path

    def export_checkpoint(self, path: Path) -> Path:
        """The run's latest checkpoint as interim weights at `path`, to evaluate a run while it trains."""
        state = load_checkpoint(self.out, self.model)
        check_resumable(state, self.run, self.out)
        self.sessions = list(state.get("sessions", []))
        self.model.eval()
        cfg = self.run.prior if state["stage"] == "prior" else self.run.joint
        return self.export(path, interim={"stage": state["stage"], "step": state["step"], "of": cfg.steps})

    @torch.no_grad()
    def calibrate_ood_threshold(self, quantile: float = 0.02, margin: float = 0.8) -> float:
        """`margin` x the 2nd percentile of the pooled modality confidence over degraded validation volumes.

        98 % of held-out in-distribution scans are then above the threshold by construction; scans under it
        are flagged as unlike the training data.
        """
        if self.model.prior is None:
            return 0.0
        confidences = []
        for val_set in self.slices.validation.values():
            for start in range(0, len(val_set), 16):
                idx = list(range(start, min(start + 16, len(val_set))))
                items = [val_set.item(i, None) for i in idx]
                clean = torch.stack([torch.as_tensor(item["clean"]) for item in items])
                modality = [item["modality"] for item in items]
                generator = step_generator(self.run.seed, "calibrate", start, 0)
                degraded, _ = degrade_batch(clean, [self.imaging[int(m)] for m in modality], generator, primitives=False)
                probs = self.model.compute_prior(degraded.to(self.device)).modality_probs
                confidences += probs.max(1).values.cpu().tolist()
        if not confidences:
            return 0.5
        return float(margin * np.quantile(confidences, quantile))


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group that `torchrun` set up, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class CsvLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.started = time.monotonic()

    def write(self, stage: str, step: int, lr: float, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["stage", "step", "lr", "seconds", "loss", "rec", "seg", "modality", "degradation"])
            row = [losses.get(k, "") for k in ("loss", "rec", "seg", "modality", "degradation")]
            writer.writerow([stage, step, f"{lr:.3g}", f"{time.monotonic() - self.started:.1f}", *row])


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, stage: str, step: int,
                    record: Mapping[str, Any] | None = None) -> None:
    """Model + optimizer tensors as safetensors, the rest (and `record`: what trained it) as JSON; each written
    atomically (rename), the JSON last, so its step never names tensors that are not on disk."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, values in opt["state"].items():
        for name, value in values.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    tmp = out / "checkpoint.tmp.safetensors"
    save_file(tensors, str(tmp), metadata={"stage": stage, "step": str(step)})
    meta = {"stage": stage, "step": step, "param_groups": opt["param_groups"], **(record or {})}
    (out / "checkpoint.tmp.json").write_text(json.dumps(meta))
    tmp.replace(out / "checkpoint.safetensors")
    (out / "checkpoint.tmp.json").replace(out / "checkpoint.json")


def load_checkpoint(out: Path, model: nn.Module) -> dict[str, Any]:
    path = out / "checkpoint.safetensors"
    if not path.is_file():
        raise ValueError(f"No checkpoint in {out} to resume from; start without --resume.")
    meta = json.loads((out / "checkpoint.json").read_text())
    check_checkpoint_pair(path, meta)
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return meta


def check_checkpoint_pair(path: Path, meta: Mapping[str, Any]) -> None:
    """Refuse tensors and JSON of different steps (a stop between the two renames, a copy or commit of one file
    only): a resume from them would repeat or skip steps with the wrong optimizer state, silently.
    Checkpoints written before the tensors carried their step are taken as they are."""
    with safe_open(str(path), framework="pt") as handle:
        stamp = handle.metadata() or {}
    if "step" in stamp and (stamp.get("stage"), int(stamp["step"])) != (meta.get("stage"), meta.get("step")):
        raise ValueError(f"{path.parent}: checkpoint.json is at {meta.get('stage')} step {meta.get('step')} but "
                         f"checkpoint.safetensors at {stamp.get('stage')} step {stamp['step']}; the two were not "
                         "written or copied together. Restore both files of one checkpoint, or start without --resume")


def load_optimizer(out: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(out / "checkpoint.safetensors"))
    meta = json.loads((out / "checkpoint.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def train_from_file(path: Path, resume: bool = False, out: str | Path | None = None,
                    session_minutes: float | None = None, export_checkpoint: Path | None = None,
                    time_steps: int = 0, threads: int | None = None) -> Path | None:
    """`vldun train`: the run of a config file; None when `session_minutes` ended it early (continue with resume).

    With `time_steps` it only times that many steps of each stage and prints seconds per step (`Trainer.time_steps`).

    With `export_checkpoint` it trains nothing: the run's latest checkpoint is written there as interim weights
    (no unknown-scan statistics), for `vldun evaluate` while the run goes on.
    """
    run = load_run_config(path, out)
    if threads is not None:
        run = replace(run, threads=threads)  # checked as the config's own `threads:` is
    if time_steps:
        trainer = Trainer(run, recipe=recipe_name(path))
        for stage, seconds in trainer.time_steps(time_steps).items():
            print(f"{stage}: {seconds:.3f} s per step (batch {getattr(run, stage.split()[0]).batch_size}; {machine()})")
        return None
    if export_checkpoint is not None:
        weights = Trainer(run, recipe=recipe_name(path)).export_checkpoint(Path(export_checkpoint))
        print(f"Interim weights written to {weights}")
        return weights
    weights = Trainer(run, session_minutes, recipe_name(path)).fit(resume)
    if weights is None:
        return None
    if run.calibrate_ood:
        calibrate_exported(weights, run.data)
    print(f"Model written to {weights} (+ {weights.with_suffix('.json').name})")
    return weights


def recipe_name(path: Path) -> str:
    """The config's path inside the repository (as the model card cites it), else its file name."""
    path = Path(path).resolve()
    root = Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def calibrate_exported(weights: Path, data: list[str]) -> None:
    """Fit the unknown-scan statistics of the exported model on its training datasets and seal them into its JSON
    (`vldun calibrate-ood --write` with the default protocol)."""
    from VLDUNLib.inference import VolumePredictor

    from .calibrate import calibrate, held_out_false_alarms
    from .datasets import read_datasets
    from .evaluate import Protocol

    if any(d.endswith(prepared.SUFFIX) for d in data):
        raise ValueError("calibrate_ood reads the dataset folders; list them as `data:` instead of a prepared file")
    predictor = VolumePredictor(weights, device="cuda" if torch.cuda.is_available() else "cpu")
    ood, validation, quantile = calibrate(predictor, read_datasets(data), Protocol(size=0))
    predictor.info.ood = ood
    rewrite_info(weights, predictor.info)
    held_out = held_out_false_alarms(ood, validation, quantile, 1.0)
    rates = ", ".join(f"{group} {entry['flagged']:.0%}" for group, entry in held_out.items())
    print(f"Unknown-scan threshold {ood.threshold:.4f} (quantile {quantile}); validation scans flagged, each case "
          f"against the threshold of the others: {rates}")
