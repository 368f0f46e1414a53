"""Modality classes and the shared label space of several datasets (one segmentation head for all)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from VLDUNLib.tasks import Task, derive_tasks

from .datasets import BACKGROUND, DatasetInfo, Imaging


@dataclass(frozen=True)
class ModalityClass:
    key: str
    """"<dataset short name>/<channel name>", e.g. "BraTS2015/FLAIR"."""
    display: str
    """What a person reads, e.g. "MRI · brain, FLAIR" (`readable_modality`)."""
    imaging: Imaging


def _check_unique(infos: Sequence[DatasetInfo]) -> None:
    names = [info.short_name for info in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset short names must be unique, got {names}; rename one in its dataset.json")


def modality_classes(infos: Sequence[DatasetInfo]) -> list[ModalityClass]:
    """One class per dataset and channel (sequence), as the paper treats each dataset as a modality."""
    _check_unique(infos)
    return [
        ModalityClass(f"{info.short_name}/{channel}", readable_modality(info, channel), info.imaging)
        for info in infos
        for channel in info.channels.values()
    ]


REGIONS: dict[str, str] = {
    "cardiac": "heart", "heart": "heart", "brain": "brain", "head": "head", "lung": "chest", "chest": "chest",
    "thorax": "chest", "thoracic": "chest", "abdominal": "abdomen", "abdomen": "abdomen", "pelvis": "pelvis",
    "pelvic": "pelvis", "knee": "knee", "spine": "spine", "prostate": "prostate", "liver": "abdomen",
}
"""Words of a dataset.json "modality" text -> the body region a person reads."""


def readable_modality(info: DatasetInfo, channel: str) -> str:
    """"<imaging> · <region>, <sequence>" from a dataset.json, e.g. "MRI · heart, cine" or "CT · chest".

    The region is the first word of the "modality" text that names one (`REGIONS`); the sequence is the
    channel name unless it only repeats the imaging ("MRI", "CT"), else what the text adds besides imaging
    and region ("cine" of "cardiac cine MRI").
    """
    words = re.findall(r"[A-Za-z0-9]+", info.modality)
    region_words = [w for w in words if w.lower() in REGIONS]
    region = REGIONS[region_words[0].lower()] if region_words else ""
    if channel.upper() not in {info.imaging, "CT", "MRI", "MR", "CBCT"}:
        sequence = channel
    else:
        skip = {info.imaging.lower(), "mri", "mr", "ct", "cbct", *(w.lower() for w in region_words)}
        sequence = " ".join(w for w in words if w.lower() not in skip)
    detail = ", ".join(part for part in (region, sequence) if part)
    return f"{info.imaging} · {detail}" if detail else info.imaging


def modality_names(infos: Sequence[DatasetInfo]) -> dict[str, str]:
    """Modality key -> readable name (`readable_modality`), for the weights' JSON."""
    return {f"{info.short_name}/{channel}": readable_modality(info, channel)
            for info in infos for channel in info.channels.values()}


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one shared segmentation head: background, then every dataset's foreground classes."""

    keys: tuple[str, ...]
    """Index 0 "background", then "<dataset>/<class>", e.g. "ACDC/RV"."""
    dataset_classes: dict[str, tuple[int, ...]]
    """Dataset short name -> global indices of its foreground classes, in the order of its label values 1..n."""

    def __post_init__(self) -> None:
        if not self.keys or self.keys[0] != BACKGROUND or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"keys must be unique and start with {BACKGROUND!r}, got {list(self.keys)[:4]}...")
        for name, indices in self.dataset_classes.items():
            if len(set(indices)) != len(indices) or not all(0 < i < len(self.keys) for i in indices):
                last = len(self.keys) - 1
                raise ValueError(f"{name}: class indices {list(indices)} must be distinct and in 1..{last}")

    def _classes(self, dataset: str) -> tuple[int, ...]:
        if dataset not in self.dataset_classes:
            raise ValueError(f"Unknown dataset {dataset!r}; the label space has {sorted(self.dataset_classes)}")
        return self.dataset_classes[dataset]

    def class_mask(self, dataset: str) -> torch.Tensor:
        """(n_global,) bool: background and the dataset's own classes, the ones its labels can teach."""
        mask = torch.zeros(len(self.keys), dtype=torch.bool)
        mask[[0, *self._classes(dataset)]] = True
        return mask

    def to_global(self, dataset: str, local: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """int64 global class indices of a dataset's label map (values 0..n of its dataset.json)."""
        return _lookup(local, [0, *self._classes(dataset)], f"{dataset} label values", "check the label file")

    def to_local(self, dataset: str, global_labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """int64 label values 0..n of ``dataset`` from global class indices of its own classes."""
        table = [-1] * len(self.keys)
        for local, index in enumerate([0, *self._classes(dataset)]):
            table[index] = local
        return _lookup(global_labels, table, f"classes outside {dataset}", "restrict the logits with class_mask first")

    def tasks(self) -> dict[str, Task]:
        """The segmentation tasks a user chooses from (`VLDUNLib.tasks`), from this label space's datasets."""
        return derive_tasks(self.dataset_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "dataset_classes": {k: list(v) for k, v in self.dataset_classes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpace:
        if set(data) != {"keys", "dataset_classes"}:
            raise ValueError(f"A label space needs exactly the keys keys, dataset_classes; got {sorted(data)}")
        return cls(tuple(data["keys"]), {k: tuple(v) for k, v in data["dataset_classes"].items()})


def _lookup(values: np.ndarray | torch.Tensor, table: list[int], what: str, fix: str) -> np.ndarray | torch.Tensor:
    """``table[values]`` as int64 in the input's framework; entries -1 or values outside the table are errors."""
    is_tensor = isinstance(values, torch.Tensor)
    array = (values.detach().cpu().numpy() if is_tensor else np.asarray(values)).astype(np.int64)
    lut = np.asarray(table, dtype=np.int64)
    inside = (array >= 0) & (array < len(lut))
    bad = np.unique(array[~inside]).tolist() if not inside.all() else []
    bad += np.flatnonzero((lut < 0) & (np.bincount(array[inside], minlength=len(lut)) > 0)).tolist()
    if bad:
        raise ValueError(f"{what}: values {bad} have no mapping (valid: {np.flatnonzero(lut >= 0).tolist()}); {fix}")
    result = lut[array]
    return torch.from_numpy(result).to(values.device) if is_tensor else result


def label_space(infos: Sequence[DatasetInfo]) -> LabelSpace:
    """Background plus each dataset's foreground classes, datasets in the given order."""
    _check_unique(infos)
    keys, classes = [BACKGROUND], {}
    for info in infos:
        names = [name for name, value in info.labels.items() if value > 0]
        classes[info.short_name] = tuple(range(len(keys), len(keys) + len(names)))
        keys += [f"{info.short_name}/{name}" for name in names]
    return LabelSpace(tuple(keys), classes)


# ------------------------------------------------------------------------------------------ training slices
