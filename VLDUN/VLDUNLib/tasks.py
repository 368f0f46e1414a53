"""What a person reads about a model's classes: readable modality names and the segmentation tasks.

The model's modality classes are training keys ("ACDC/MRI", "BraTS2015/T1c"); a user reads the imaging
modality, body region and sequence instead ("MRI · heart, cine"). Its segmentation head holds the classes of
every training dataset; a *task* ("heart", "brain_tumour", ...) is the group of classes a user asks for, one
or more datasets that label the same anatomy. Both are stored in the weights' JSON (the lab fills them from
each dataset.json); the defaults here cover the datasets of the shipped model, for JSONs that lack them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
"""The task named by the detected modality."""

TASK_LABELS: dict[str, str] = {
    "heart": "Heart: ventricles and myocardium",
    "brain_tumour": "Brain tumour",
    "lung_infection": "Lung infection",
    "abdominal_organs": "Abdominal organs: liver, spleen, kidneys",
}
"""Task id -> what the user reads, in the order a selector lists them."""

DATASET_TASKS: dict[str, str] = {
    "ACDC": "heart",
    "BraTS2015": "brain_tumour",
    "BraTS2018": "brain_tumour",
    "COVID19CT": "lung_infection",
    "AbdomenCT": "abdominal_organs",
}
"""Dataset short name (dataset.json "name") -> the task its labels teach."""

DEFAULT_MODALITY_NAMES: dict[str, str] = {
    "ACDC/MRI": "MRI · heart, cine",
    "BraTS2015/T1c": "MRI · brain, T1c",
    "BraTS2015/FLAIR": "MRI · brain, FLAIR",
    "COVID19CT/CT": "CT · chest",
    "AbdomenCT/CT": "CT · abdomen",
}
"""Readable names of the shipped model's modality classes, as the lab derives them from the dataset.json files."""


@dataclass(frozen=True)
class Task:
    """A group of segmentation classes a user can ask for."""

    label: str
    """Readable, e.g. "Brain tumour"."""
    datasets: tuple[str, ...]
    """Dataset short names whose classes the task reports."""
    classes: tuple[int, ...]
    """Global class indices of the segmentation head, in order; label values 1..n of the output."""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "datasets": list(self.datasets), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        return cls(str(data["label"]), tuple(data["datasets"]), tuple(int(i) for i in data["classes"]))


def task_of_dataset(dataset: str) -> str:
    """The task a dataset's labels belong to; a dataset of no known task is its own task, named after it."""
    return DATASET_TASKS.get(dataset, dataset)


def derive_tasks(dataset_classes: Mapping[str, Sequence[int]]) -> dict[str, Task]:
    """Tasks from a model's datasets: each known dataset joins its task, an unknown one is a task of its own.

    Two datasets of one task (BraTS2015 and BraTS2018) pool their classes, in dataset order.
    """
    grouped: dict[str, list[str]] = {}
    for dataset in dataset_classes:
        grouped.setdefault(task_of_dataset(dataset), []).append(dataset)
    order = [t for t in TASK_LABELS if t in grouped] + [t for t in grouped if t not in TASK_LABELS]
    tasks = {}
    for task in order:
        datasets = tuple(grouped[task])
        classes = tuple(dict.fromkeys(i for d in datasets for i in dataset_classes[d]))
        tasks[task] = Task(TASK_LABELS.get(task, task.replace("_", " ").capitalize()), datasets, classes)
    return tasks


def default_modality_names(modalities: Sequence[str]) -> dict[str, str]:
    """Readable names for modality keys without stored ones: the shipped names, else the key itself."""
    return {key: DEFAULT_MODALITY_NAMES.get(key, key) for key in modalities}
