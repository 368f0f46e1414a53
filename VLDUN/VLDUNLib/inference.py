"""Restore and segment a whole volume, slice by slice, with the prior computed once per volume.

The volume is streamed: only one batch of slices is ever held as float32 tensors, so memory stays flat
for 512x512x300 volumes. Intensities are normalised by the same function as in training
(`intensity.fit_window`, fitted once on the whole volume); the network's correction is mapped back to the
input's scale and voxels outside the window keep their own values (`intensity.restore_outside_window`).
The segmentation head covers the classes of every training dataset; the user's task selects which are reported (`tasks.Task`), or with task "auto" the detected modality's task.
A scan unlike the training data (`ood.NearestNeighbourOOD`) is restored but, in "auto", not segmented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import NO_DEGRADATION, NO_DEGRADATION_TEXT
from .intensity import (
    IntensityWindow,
    fit_window,
    normalize,
    restore_outside_window,
    to_unit_range,
)
from .letterbox import content_box, resize_images
from .network import VLDUN
from .priors import PriorOutput
from .results import Cancelled, Detection, Prediction, SegmentClass
from .ssm import missing_cuda_scan
from .tasks import AUTO, task_of_dataset
from .terminology import display_name
from .weights import ModelInfo, load_model

PRIOR_SLICES = 5
"""Slices the prior looks at per volume (evenly spaced over the central 60 %)."""

PRIOR_TILES_PER_AXIS = 4
"""At most 4 x 4 tiles of a slice for the prior: 16 of 128 pixels cover a 512-pixel slice."""

MAX_BATCH_PIXELS = 8 * 256 * 256
"""Most pixels in one batch: the batch size shrinks for large slices (2 at 512², 1 at 1024²), so the
network's working memory stays that of 8 slices of 256² whatever the scan."""

MIRRORS = ((-1,), (-2,), (-2, -1))
"""The flips of test-time mirroring (`VolumePredictor(mirror=True)`): left-right, up-down, both."""


class DeviceOutOfMemory(MemoryError):
    """The GPU ran out of memory where no batch is left to halve; the same run fits on the CPU (main memory)."""

    def __init__(self, step: str) -> None:
        super().__init__(f"The GPU ran out of memory {step}; run on device 'cpu' instead.")


@contextmanager
def _cpu_fix_on_out_of_memory(step: str) -> Iterator[None]:
    """A CUDA out-of-memory error in `step` (no batch to halve there) -> `DeviceOutOfMemory`, which names the fix.

    A small GPU can fail already in loading the model or in the prior, so those need the same answer as batch 1.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise DeviceOutOfMemory(step) from error


@dataclass
class ScanPrior:
    """The prior of one scan, computed once from a few slices, at the geometry each pass of the network reads."""

    native: PriorOutput
    """Pooled over `prior_tiles`: conditions restoration at the scan's own resolution, and is the detection shown."""
    scaled: PriorOutput
    """Of the slices letterboxed to the training size: the segmentation pass reads those, as in training."""

    def expand(self, batch: int) -> ScanPrior:
        return ScanPrior(self.native.expand(batch), self.scaled.expand(batch))


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was chosen but no CUDA GPU is usable here; choose 'auto' or 'cpu'.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was chosen but Apple MPS is not available here; choose 'auto' or 'cpu'.")
    if device not in ("cuda", "mps", "cpu"):
        raise ValueError(f"Unknown device {device!r}; choose auto, cuda, mps or cpu.")
    return torch.device(device)


def prior_slice_indices(num_slices: int, count: int = PRIOR_SLICES) -> list[int]:
    """Representative slices: evenly spaced over the central 60 % of the stack (the ends are often empty)."""
    if num_slices <= count:
        return list(range(num_slices))
    lo, hi = 0.2 * (num_slices - 1), 0.8 * (num_slices - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, count)})


def tile_starts(length: int, tile: int) -> list[int]:
    """Offsets of at most `PRIOR_TILES_PER_AXIS` tiles spread evenly from edge to edge (overlapping where they must)."""
    if length <= tile:
        return [0]
    count = min(PRIOR_TILES_PER_AXIS, math.ceil(length / tile))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def prior_tiles(slices: torch.Tensor, size: int) -> torch.Tensor:
    """Slices (B, 1, H, W) -> what the prior reads: size x size tiles at the scan's own pixel scale.

    The prior learned degradations on slices of `size` pixels (`info.train_size`), degraded at that
    size: noise per pixel, blur and ghosting widths in pixels. A 256-pixel scan squeezed into the prior's
    input halves those widths and averages the noise away; tiles of `size` of its own pixels keep them
    (the lab trains the prior on such tiles too).
    Slices no larger than `size` are letterboxed as in training (`letterbox.resize_images`).
    """
    height, width = slices.shape[-2:]
    if height <= size and width <= size:
        return resize_images(slices, size)
    tiles = [slices[..., top : top + size, left : left + size]
             for top in tile_starts(height, size) for left in tile_starts(width, size)]
    return torch.cat([resize_images(tile, size) for tile in tiles])


class VolumePredictor:
    """A loaded model that turns a degraded volume into a restored volume, labels and a detection."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "auto",
        model: tuple[VLDUN, ModelInfo] | None = None,
        mirror: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.mirror = mirror
        if advice := missing_cuda_scan(self.device):
            warnings.warn(advice, RuntimeWarning, stacklevel=2)
        self.model, self.info = model if model is not None else load_model(weights, "cpu")
        with _cpu_fix_on_out_of_memory("loading the model"):
            self.model.to(self.device).eval()

    def _slices(self, volume: np.ndarray, window: IntensityWindow, indices: range | list[int]) -> torch.Tensor:
        batch = np.asarray(volume[list(indices)], dtype=np.float32)
        tensor = torch.from_numpy(to_unit_range(normalize(batch, window)))
        return tensor[:, None].to(self.device)

    def rescales(self, height: int, width: int) -> bool:
        """Whether slices of this size are segmented in a second pass at the training scale (not for a model that
        learned to segment at the scans' own size, `ModelInfo.segment_native`)."""
        size = self.info.train_size
        native = self.info.segment_native
        return self.model.config.seg_head and not native and size is not None and max(height, width) != size

    def forward_slices(
        self, batch: torch.Tensor, prior: ScanPrior | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Restored slices at their own size, and segmentation logits computed at the training scale.

        The model learned anatomy at `info.train_size` pixels per longer side, centred on a black square
        (`letterbox.resize_slices`): on a 512-pixel slice a heart is four times larger than any it saw.
        Restoration stays at native resolution (it must keep every pixel); the second, segmentation pass
        costs a quarter of the first for 256-pixel slices and less above. Each pass skips the head whose
        output the other one gives.
        """
        config, size = self.model.config, self.info.train_size
        height, width = batch.shape[-2:]
        rescale = self.rescales(height, width)
        restored = logits = None
        native = prior.native if prior else None
        if config.rec_head or not rescale:
            out = self.model(batch, native, segment=not rescale)
            restored, logits = out.restored, out.seg_logits
        if not rescale:
            return restored, logits if logits is None else self.segment(batch, native, logits)
        top, left, rows, cols = content_box(height, width, size)
        logits = self.segment(resize_images(batch, size), prior.scaled if prior else None)
        logits = logits[..., top : top + rows, left : left + cols]
        return restored, F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)

    def segment(
        self, batch: torch.Tensor, prior: PriorOutput | None, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Segmentation scores of a batch: its logits (`logits`, when a pass already gave them), or with
        `mirror` the class probabilities averaged over the batch and its 3 mirror images, as nnU-Net does at test
        time, for 4x the segmentation pass. Off by default: it helps large organs and hurts small lesions
        (MODEL_CARD.md)."""
        if logits is None:
            logits = self.model(batch, prior, restore=False).seg_logits
        if not self.mirror:
            return logits
        probabilities = logits.float().softmax(1)
        for dims in MIRRORS:
            mirrored = self.model(batch.flip(dims), prior, restore=False).seg_logits
            probabilities += mirrored.float().softmax(1).flip(dims)
        return probabilities / (len(MIRRORS) + 1)

    @torch.no_grad()
    def slice_prior(self, slices: torch.Tensor) -> PriorOutput | None:
        """The detection prior of a scan from a few of its degraded slices (B, 1, H, W), pooled over `prior_tiles`."""
        if self.model.prior is None:
            return None
        size = self.info.train_size
        return self.model.compute_prior(prior_tiles(slices, size) if size else slices).pooled()

    @torch.no_grad()
    def scan_prior(self, slices: torch.Tensor) -> ScanPrior | None:
        """Both priors of a scan. Each pass is conditioned on the prior of the image it reads, as in training:
        the tiles' prior describes the native-size image, not the letterboxed one the segmentation pass reads."""
        native = self.slice_prior(slices)
        if native is None:
            return None
        size = self.info.train_size
        if not self.rescales(*slices.shape[-2:]) or max(slices.shape[-2:]) <= size:
            return ScanPrior(native, native)
        return ScanPrior(native, self.model.compute_prior(resize_images(slices, size)).pooled())

    @torch.no_grad()
    def volume_prior(self, volume: np.ndarray, window: IntensityWindow, degradation_override: str | None) -> ScanPrior | None:
        prior = self.scan_prior(self._slices(volume, window, prior_slice_indices(len(volume))))
        if prior is None or not degradation_override:
            return prior
        names = self.model.config.degradations
        if degradation_override not in names:
            raise ValueError(f"Unknown degradation {degradation_override!r}; choose one of {list(names)}.")
        index = names.index(degradation_override)
        return ScanPrior(*(self.model.prior.with_degradation(p, index) for p in (prior.native, prior.scaled)))

    def tasks(self) -> dict[str, str]:
        """Task id -> readable label, the choices for `predict(task=...)` besides "auto" (for a selector)."""
        return self.info.task_labels()

    def detection(self, prior: PriorOutput | None, task: str = AUTO) -> Detection:
        """What the prior detected, with the classes of `task` ("auto": the detected modality's task)."""
        self.check_task(task)
        config = self.model.config
        if prior is None:
            detection = Detection("unknown (model without prior)", 0.0, {}, "unknown", 0.0, {}, True, [])
            return self.with_task(detection, task)
        mod = prior.modality_probs[0].cpu().tolist()
        deg = prior.degradation_probs[0].cpu().tolist()
        m, d = int(np.argmax(mod)), int(np.argmax(deg))
        key = config.modalities[m]
        score, unknown = self.unknown_score(prior, mod[m])
        detection = Detection(
            modality=self.info.modality_names.get(key, key),
            modality_probability=mod[m],
            modality_probabilities=dict(zip(config.modalities, mod)),
            degradation=NO_DEGRADATION_TEXT if config.degradations[d] == NO_DEGRADATION else config.degradations[d],
            degradation_probability=deg[d],
            degradation_probabilities=dict(zip(config.degradations, deg)),
            out_of_distribution=unknown,
            segments=[],
            modality_key=key,
            ood_score=score,
        )
        return self.with_task(detection, task)

    def unknown_score(self, prior: PriorOutput, probability: float) -> tuple[float | None, bool]:
        """(score, flagged): the embedding's cosine distance to the nearest training scan when the model has
        unknown-scan references, else (None, modality probability under `ood_threshold`)."""
        statistics = self.info.ood
        if statistics is None:
            return None, probability < self.info.ood_threshold
        score = statistics.score(prior.embedding[0].float().cpu().numpy())
        return score, statistics.is_unknown(score)

    def check_task(self, task: str) -> None:
        if task != AUTO and task not in self.tasks():
            raise ValueError(f"Unknown task {task!r}; choose {AUTO!r} or one of {list(self.tasks())}.")

    def with_task(self, detection: Detection, task: str) -> Detection:
        """The detection with the segments of `task`; in "auto", of the detected modality's task, or none with a
        note when the scan is unknown."""
        if task == AUTO:
            task = self.detected_task(detection)
        if task is None:
            choices = "|".join(self.tasks())
            reason = ("the scan is unlike the training data" if detection.out_of_distribution
                      else f"no task matches the detected modality {detection.modality!r}")
            detection.segmentation_note = f"not segmented: {reason}; choose a task (--task {choices}) to segment anyway"
            return detection
        detection.task = task
        detection.segments = self.segments(task)
        return detection

    def detected_task(self, detection: Detection) -> str | None:
        """The task of the detected modality's dataset; None for an unknown scan."""
        if detection.out_of_distribution or not detection.modality_key:
            return None
        dataset = detection.modality_key.split("/")[0]
        for task_id, task in self.info.tasks.items():
            if dataset in task.datasets and task.classes:
                return task_id
        fallback = task_of_dataset(dataset)
        return fallback if fallback in self.tasks() else None

    def segments(self, task: str) -> list[SegmentClass]:
        """The classes of a task, numbered 1..n."""
        indices = self.info.tasks[task].classes
        return [SegmentClass(i + 1, display_name(self.info.classes[g]), self.info.classes[g]) for i, g in enumerate(indices)]

    @torch.no_grad()
    def predict(
        self,
        volume: np.ndarray,
        *,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        degradation_override: str | None = None,
        task: str = AUTO,
    ) -> Prediction:
        """Volume (S, H, W), slices along axis 0, any real dtype -> restored volume, labels and detection.

        `task` names the classes to segment (`tasks()`); "auto" takes the detected modality's task and leaves an
        unknown scan unsegmented (labels all 0, `detection.segmentation_note` says why).
        """
        if volume.ndim != 3:
            raise ValueError(f"Expected a (slices, rows, columns) array, got shape {volume.shape}.")
        self.check_task(task)
        window = fit_window(volume)
        with _cpu_fix_on_out_of_memory("computing the vision-language prior"):
            prior = self.volume_prior(volume, window, degradation_override)
        detection = self.detection(prior.native if prior else None, task)
        global_ids = torch.tensor([0] + [self.info.classes.index(s.key) for s in detection.segments], device=self.device)
        restored = np.empty(volume.shape, np.float32)
        labels = np.zeros(volume.shape, np.uint8)
        batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (volume.shape[1] * volume.shape[2])))
        total, start = len(volume), 0
        while start < total:
            if should_cancel is not None and should_cancel():
                raise Cancelled("Cancelled by the user; nothing was written.")
            stop = min(start + batch_size, total)
            try:
                batch = self._slices(volume, window, range(start, stop))
                batch_prior = prior.expand(stop - start) if prior else None
                restored_batch, seg_logits = self.forward_slices(batch, batch_prior)
            except torch.cuda.OutOfMemoryError as error:
                if batch_size == 1:
                    raise DeviceOutOfMemory("even one slice at a time") from error
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                batch_size = max(1, batch_size // 2)
                continue
            if restored_batch is not None:
                restored[start:stop] = restore_outside_window(
                    volume[start:stop], batch[:, 0].cpu().numpy(), restored_batch[:, 0].float().cpu().numpy(), window)
            else:
                restored[start:stop] = volume[start:stop]
            if seg_logits is not None and detection.segments:
                picked = seg_logits.index_select(1, global_ids).argmax(1)
                labels[start:stop] = picked.to(torch.uint8).cpu().numpy()
            start = stop
            if progress is not None:
                progress(start, total)
        return Prediction(restored, labels, detection)

