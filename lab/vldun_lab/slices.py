"""Training slices in memory: every slice of some cases, normalised and letterboxed, with a balanced sampler."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler
from VLDUNLib.intensity import fit_window, normalize, to_unit_range
from VLDUNLib.letterbox import resize_slices

from .augmentation import Augmentation
from .datasets import CaseLike, DatasetError, DatasetInfo, _as_case, load_case
from .labels import LabelSpace, ModalityClass, label_space, modality_classes

log = logging.getLogger(__name__)


class SliceDataset(Dataset):
    """All slices of some cases of several datasets, held in memory at patch size.

    Each volume is normalised once with ``intensity.fit_window`` + ``to_unit_range``, then every slice is
    resized and padded to patch x patch (``resize_slices``); labels become global classes of the label space.
    Slices that are all zero after normalisation (outside the body or brain) are skipped and counted in
    ``skipped``. A multi-channel dataset gives one sample per channel and slice, each channel its own modality
    class. Degradation is not applied here: it runs batched on the training device. With ``native``, each sample
    also keeps its normalised slice at the scan's own size (8-bit, as `prepared` stores images), from which
    ``native_indices`` and ``native_slice`` give the prior tiles at the scale `inference.prior_tiles` reads;
    with ``native_labels`` also its label map at that size (``native_label``), for segmentation at that scale.
    """

    def __init__(
        self,
        infos: Sequence[DatasetInfo],
        cases: Sequence[CaseLike],
        modalities: Sequence[ModalityClass] | None = None,
        labels: LabelSpace | None = None,
        patch: int = 128,
        augment: bool = False,
        native: bool = False,
        native_labels: bool = False,
    ) -> None:
        self.infos = {info.short_name: info for info in infos}
        self._set_spaces(
            modalities if modalities is not None else modality_classes(infos),
            labels if labels is not None else label_space(infos),
            patch,
            augment,
        )
        label_dtype = torch.uint8 if len(self.label_space.keys) <= 256 else torch.int32
        images, label_maps, meta, problems = [], [], [], []
        self.native = [] if native else None
        self.native_labels = [] if native and native_labels else None
        for case in cases:
            for channel, modality in self._channels(case):
                try:
                    image, label = self._slices(case, channel, label_dtype)
                except DatasetError as error:
                    problems += error.problems
                    continue
                images.append(image)
                label_maps.append(label)
                meta += [(self.datasets.index(case.dataset), modality)] * len(image)
        if problems:
            raise DatasetError(problems, "the training cases")
        if self.skipped:
            log.info("SliceDataset: skipped %d all-zero slice(s) of %d", self.skipped, self.skipped + len(meta))
        self.images = torch.cat(images) if images else torch.zeros(0, 1, patch, patch)
        self.labels = torch.cat(label_maps) if label_maps else torch.zeros(0, patch, patch, dtype=label_dtype)
        self.sample_dataset = torch.tensor([m[0] for m in meta], dtype=torch.int64)
        self.sample_modality = torch.tensor([m[1] for m in meta], dtype=torch.int64)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        modalities: Sequence[ModalityClass],
        labels: LabelSpace,
        patch: int,
        augment: bool = False,
    ) -> SliceDataset:
        """Slices already at patch size (``images``, ``labels``, ``sample_dataset``, ``sample_modality``, as
        the attributes of that name): nothing is read, normalised or resized (``prepared.load``)."""
        dataset = cls.__new__(cls)
        dataset.infos, dataset.native, dataset.native_labels = {}, None, None
        dataset._set_spaces(modalities, labels, patch, augment)
        dataset.images, dataset.labels = tensors["images"], tensors["labels"]
        dataset.sample_dataset, dataset.sample_modality = tensors["sample_dataset"], tensors["sample_modality"]
        return dataset

    def _set_spaces(self, modalities: Sequence[ModalityClass], labels: LabelSpace, patch: int, augment: bool) -> None:
        if patch < 16:
            raise ValueError(f"patch must be at least 16 pixels, got {patch}")
        self.modalities, self.label_space = list(modalities), labels
        self.datasets = list(labels.dataset_classes)
        self.patch, self.augment, self.skipped = patch, augment, 0
        self.augmentation = Augmentation()
        self._masks = {name: labels.class_mask(name) for name in self.datasets}

    def _channels(self, case: CaseLike) -> list[tuple[int, int]]:
        """(channel, modality class index) of every channel of a case."""
        if case.dataset not in self.infos or case.dataset not in self._masks:
            raise ValueError(f"{case.case_id} is from dataset {case.dataset!r}, which the given infos/labels lack")
        keys = [m.key for m in self.modalities]
        channels = self.infos[case.dataset].channels
        missing = [f"{case.dataset}/{name}" for name in channels.values() if f"{case.dataset}/{name}" not in keys]
        if missing:
            raise ValueError(f"modality classes {missing} are not among the model's {keys}")
        return [(c, keys.index(f"{case.dataset}/{name}")) for c, name in channels.items()]

    def _slices(self, case: CaseLike, channel: int, label_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, non-empty, patch-sized slices (n, 1, P, P) and their global labels (n, P, P)."""
        whole, selection = _as_case(case)
        volume, label = load_case(whole, channel)
        if label is None:
            raise DatasetError([f"{case.case_id}: training slices need a label file"], f"dataset {case.dataset}")
        try:
            window = fit_window(volume)
        except ValueError as error:
            raise DatasetError([f"{case.case_id}: {whole.images[channel].name}: {error}"], case.dataset) from error
        image = to_unit_range(normalize(volume[selection], window))
        keep = np.flatnonzero(image.reshape(len(image), -1).any(axis=1))
        self.skipped += len(image) - len(keep)
        if self.native is not None:
            self.native += list(torch.from_numpy(np.round(255 * np.clip(image[keep], 0, 1))).to(torch.uint8))
        if self.native_labels is not None:
            own = self.label_space.to_global(case.dataset, label[selection][keep])
            self.native_labels += list(torch.from_numpy(np.ascontiguousarray(own)).to(label_dtype))
        images = torch.from_numpy(resize_slices(image[keep], self.patch, "image"))[:, None]
        local = resize_slices(label[selection][keep], self.patch, "label")
        labels = torch.from_numpy(self.label_space.to_global(case.dataset, local))
        return images, labels.to(label_dtype)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Sample ``index``; with ``augment``, ``augmentation`` changes it with draws from ``generator`` (None:
        torch's RNG)."""
        index = int(index)
        image, label = self.images[index].clone(), self.labels[index].to(torch.int64)
        if self.augment:
            image, label = self.augmentation(image, label, generator)
        dataset = int(self.sample_dataset[index])
        return {
            "clean": image,
            "label": label,
            "modality": self.sample_modality[index].clone(),
            "dataset": self.sample_dataset[index].clone(),
            "class_mask": self._masks[self.datasets[dataset]].clone(),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index)

    def dataset_shares(self, weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """Per dataset (in ``datasets`` order), its weight in ``weights`` by short name, 1 where not named.

        A name that is not one of these datasets is an error rather than a weight that silently does nothing.
        """
        weights = dict(weights or {})
        if unknown := sorted(set(weights) - set(self.datasets)):
            raise ValueError(f"dataset_weights names {unknown}, which are not datasets here; use the short names "
                             f"{self.datasets} (the `name` of each dataset.json)")
        shares = torch.tensor([float(weights.get(name, 1.0)) for name in self.datasets], dtype=torch.double)
        if (shares < 0).any() or not (shares > 0).any():
            raise ValueError(f"dataset_weights must be 0 or more with at least one above 0; got {weights}")
        return shares

    def sample_weights(self, weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """(weight of the sample's dataset) / (slices of that dataset): each dataset carries its weight
        (`dataset_shares`, equal by default) in total, whatever its size."""
        if len(self) == 0:
            raise ValueError("The SliceDataset has no slices; give it cases with non-empty images")
        counts = torch.bincount(self.sample_dataset).double()
        return self.dataset_shares(weights)[self.sample_dataset] / counts[self.sample_dataset]

    def balanced_indices(
        self, count: int, generator: torch.Generator | None = None, weights: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """``count`` sample indices, each dataset drawn in proportion to its weight (equally often by default)
        regardless of its size."""
        return torch.multinomial(self.sample_weights(weights), count, replacement=True, generator=generator)

    def native_indices(
        self, count: int, size: int, generator: torch.Generator | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> torch.Tensor:
        """``count`` indices of samples whose own slice is larger than ``size`` on a side (smaller ones are read
        whole, as at patch size), each such dataset drawn in proportion to its weight (equally often by default);
        empty when there are none."""
        if self.native is None:
            raise ValueError("This SliceDataset holds no slices at their own size: build it from the dataset folders "
                             "with native=True (a prepared .vldun file keeps patch-size slices only)")
        large = torch.tensor([max(s.shape) > size for s in self.native], dtype=torch.bool)
        if count == 0 or not large.any():
            return torch.zeros(0, dtype=torch.int64)
        counts = torch.bincount(self.sample_dataset[large], minlength=len(self.datasets)).double()
        shares = self.dataset_shares(weights)[self.sample_dataset]
        chances = torch.where(large, shares / counts.clamp_min(1)[self.sample_dataset], 0.0)
        if not chances.any():
            return torch.zeros(0, dtype=torch.int64)
        return torch.multinomial(chances, count, replacement=True, generator=generator)

    def native_slice(self, index: int) -> torch.Tensor:
        """Sample ``index`` at the scan's own size, (1, 1, H, W) float in [0, 1]."""
        return self.native[int(index)][None, None].float() / 255

    def native_label(self, index: int) -> torch.Tensor:
        """The global label map of sample ``index`` at the scan's own size, (H, W) int64."""
        if self.native_labels is None:
            raise ValueError("This SliceDataset keeps no label maps at the scans' own size: build it with "
                             "native_labels=True")
        return self.native_labels[int(index)].to(torch.int64)

    def class_mask_of(self, index: int) -> torch.Tensor:
        """The classes the dataset of sample ``index`` labels (`LabelSpace.class_mask`)."""
        return self._masks[self.datasets[int(self.sample_dataset[int(index)])]].clone()


def balanced_sampler(ds: SliceDataset, num_samples: int, seed: int) -> Sampler[int]:
    """A seeded sampler drawing every dataset equally often regardless of its size (with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(ds.sample_weights(), num_samples, replacement=True, generator=generator)
