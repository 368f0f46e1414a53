"""Training slices prepared once into one file, as nnU-Net preprocesses before it trains.

`vldun prepare RUN.yaml --out FILE.vldun` reads the run's dataset folders exactly as `vldun train` does (same
seeded split, normalisation and patch size) and writes every training and validation slice, its labels, the
shared label space and the modality classes to one gzip-compressed safetensors file. A run config whose
`data:` is that one file then trains without the image folders and without SimpleITK: on a GPU machine the
raw datasets cannot reach, or on a cluster where copying thousands of NIfTI files is the slow part.

Images are stored as 8 bits, round(255 x) of the [0, 1] slices a training batch starts from: the grey levels
of a windowed display, an error of at most 1/510 (a 59 dB PSNR ceiling, far above the 20-35 dB the model
restores to). The four datasets of ../shared/data at 128 px take 21 MB instead of 110 MB of NIfTI.
"""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .datasets import CaseLike, SliceRef, read_datasets
from .labels import LabelSpace, ModalityClass, label_space, modality_classes
from .slices import SliceDataset
from .splits import split_cases

SUFFIX = ".vldun"
FORMAT, VERSION = "vldun-prepared-slices", 2
_FIELDS = ("images", "labels", "sample_dataset", "sample_modality")


@dataclass
class TrainingSlices:
    """What a training run reads from its data: the training slices, each dataset's validation slices and
    validation case names (keyed by dataset folder name), and the class and modality spaces."""

    modalities: list[ModalityClass]
    labels: LabelSpace
    train: SliceDataset
    validation: dict[str, SliceDataset]
    validation_cases: dict[str, list[str]]
    training_cases: dict[str, list[str]]
    """The cases the training slices come from, per dataset folder: what the exported model never evaluates on."""
    patch: int
    val_fraction: float
    seed: int


def describe_case(case: CaseLike) -> str:
    """A case id, with its slice range when a single-patient dataset was split by slices."""
    return f"{case.case_id}[{case.start}:{case.stop}]" if isinstance(case, SliceRef) else case.case_id


def from_folders(data: list[str], patch: int, val_fraction: float, seed: int, native: bool = False,
                 native_labels: bool = False) -> TrainingSlices:
    """The slices of dataset folders, split per dataset by ``split_cases(val_fraction, seed)``; with ``native`` the
    training slices also keep their own size, with ``native_labels`` their label maps too (``SliceDataset``)."""
    infos = read_datasets(data)
    modalities, labels = modality_classes(infos), label_space(infos)
    splits = {info.name: split_cases(info, val_fraction, seed) for info in infos}
    train_cases = [case for train, _ in splits.values() for case in train]
    return TrainingSlices(
        modalities=modalities,
        labels=labels,
        train=SliceDataset(infos, train_cases, modalities, labels, patch=patch, augment=True, native=native,
                           native_labels=native_labels),
        validation={
            info.name: SliceDataset([info], splits[info.name][1], modalities, labels, patch=patch) for info in infos
        },
        validation_cases={name: [describe_case(c) for c in val] for name, (_, val) in splits.items()},
        training_cases={name: [describe_case(c) for c in train] for name, (train, _) in splits.items()},
        patch=patch,
        val_fraction=val_fraction,
        seed=seed,
    )


def _quantised(dataset: SliceDataset, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}/{name}": getattr(dataset, name).contiguous() for name in _FIELDS}
    tensors[f"{prefix}/images"] = (dataset.images.clamp(0, 1) * 255).round().to(torch.uint8)
    return tensors


def save(slices: TrainingSlices, path: str | Path) -> Path:
    """Write ``slices`` to one gzip-compressed safetensors file (no pickle), its description in the header."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"A prepared-slices file must end in {SUFFIX}, got {path.name}")
    tensors = _quantised(slices.train, "train")
    for name, dataset in slices.validation.items():
        tensors.update(_quantised(dataset, f"validation/{name}"))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "patch": slices.patch,
        "val_fraction": slices.val_fraction,
        "seed": slices.seed,
        "modalities": [asdict(m) for m in slices.modalities],
        "labels": slices.labels.to_dict(),
        "validation_cases": slices.validation_cases,
        "training_cases": slices.training_cases,
        "images": "uint8 round(255 x) of the [0, 1] training slices",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(save_tensors(tensors, metadata={FORMAT: json.dumps(meta)}), compresslevel=6))
    return path


def _header(raw: bytes, path: Path) -> dict[str, Any]:
    """The JSON description stored in the safetensors header (8-byte length, then the header itself)."""
    try:
        length = struct.unpack("<Q", raw[:8])[0]
        return json.loads(json.loads(raw[8 : 8 + length])["__metadata__"][FORMAT])
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a prepared-slices file ({error}); make one with "
                         f"`vldun prepare RUN.yaml --out FILE{SUFFIX}`") from error


def load(path: str | Path) -> TrainingSlices:
    """A file written by ``save``: training slices augmented as in training, validation slices as they are."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise ValueError(f"Cannot read {path}: {error}; make it again with `vldun prepare`") from error
    meta = _header(raw, path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is {meta.get('format')} version {meta.get('version')}; this VLDUN reads "
                         f"{FORMAT} version {VERSION}: prepare it again with `vldun prepare`")
    tensors = load_tensors(raw)
    modalities = [ModalityClass(**m) for m in meta["modalities"]]
    labels = LabelSpace.from_dict(meta["labels"])

    def dataset(prefix: str, augment: bool) -> SliceDataset:
        own = {name: tensors[f"{prefix}/{name}"] for name in _FIELDS}
        own["images"] = own["images"].float() / 255
        return SliceDataset.from_tensors(own, modalities, labels, meta["patch"], augment)

    return TrainingSlices(
        modalities=modalities,
        labels=labels,
        train=dataset("train", augment=True),
        validation={name: dataset(f"validation/{name}", augment=False) for name in meta["validation_cases"]},
        validation_cases={k: list(v) for k, v in meta["validation_cases"].items()},
        training_cases={k: list(v) for k, v in meta["training_cases"].items()},
        patch=meta["patch"],
        val_fraction=meta["val_fraction"],
        seed=meta["seed"],
    )


def for_run(data: list[str], patch: int, val_fraction: float, seed: int, native: bool = False,
            native_labels: bool = False) -> TrainingSlices:
    """A run's training data: one prepared file, or dataset folders read now (``native``, ``native_labels``: see
    ``from_folders``)."""
    prepared = [d for d in data if d.endswith(SUFFIX)]
    if not prepared:
        return from_folders(data, patch, val_fraction, seed, native, native_labels)
    if len(data) > 1:
        raise ValueError(f"A prepared file ({prepared[0]}) already holds every dataset of its run; give it alone "
                         "as `data:`, or list the dataset folders instead")
    if native:
        raise ValueError(f"{prepared[0]} holds slices at patch size only, and prior_native_fraction needs them at "
                         "their own size: list the dataset folders as `data:`, or set prior_native_fraction: 0")
    slices = load(prepared[0])
    if (slices.patch, slices.val_fraction, slices.seed) != (patch, val_fraction, seed):
        raise ValueError(f"{prepared[0]} was prepared with patch {slices.patch}, val_fraction {slices.val_fraction} "
                         f"and split seed {slices.seed}, but the run asks for {patch}, {val_fraction} and {seed}: set "
                         "those in the run config (`split_seed` for the split), or prepare the file again with it")
    return slices
