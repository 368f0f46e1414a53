"""Letterboxing: a slice resized so its longer side is the training size, centred on a black square.

The model learned anatomy at one scale (`ModelInfo.train_size`), so inference segments at that geometry
and maps the result back (`inference.VolumePredictor.forward_slices`); training builds its samples the same way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


def content_box(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a height x width slice once resized to longer side ``patch`` and centred."""
    scale = patch / max(height, width)
    size = max(1, round(height * scale)), max(1, round(width * scale))
    return (patch - size[0]) // 2, (patch - size[1]) // 2, *size


def _pad_centre(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad the last two axes to patch x patch with the content centred."""
    height, width = x.shape[-2:]
    top, left = (patch - height) // 2, (patch - width) // 2
    return F.pad(x, (left, patch - width - left, top, patch - height - top))


def _nearest_indices(size_in: int, size_out: int) -> torch.Tensor:
    """Source pixel of each output pixel for nearest-neighbour resizing (pixel centres aligned)."""
    centres = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)
    return centres.floor().long().clamp(max=size_in - 1)


def resize_images(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) float images at longer side ``patch`` (area averaging down, bilinear up, so [0, 1] stays
    [0, 1]), centre-padded with 0 to (N, C, P, P): the geometry of every training sample."""
    _, _, height, width = content_box(*images.shape[-2:], patch)
    mode = "area" if height < images.shape[-2] else "bilinear"
    options = {} if mode == "area" else {"align_corners": False}
    resized = F.interpolate(images, size=(height, width), mode=mode, **options)
    return _pad_centre(resized, patch)


def resize_slices(slices: np.ndarray, patch: int, kind: Literal["image", "label"]) -> np.ndarray:
    """(S, H, W) slices resized so the longer side is ``patch`` (aspect kept), centre-padded to (S, P, P).

    The geometry of every training sample, so evaluation can reproduce it. Images (float32) go through
    ``resize_images``; labels take the nearest pixel (pixel centres aligned) and keep their dtype, so no
    class values are invented. Padding is 0: black image, background.
    """
    if slices.ndim != 3 or kind not in ("image", "label"):
        raise ValueError(f"resize_slices needs (S, H, W) slices and kind 'image'/'label', got {slices.shape}, {kind!r}")
    if kind == "label":
        _, _, height, width = content_box(*slices.shape[-2:], patch)
        rows, cols = _nearest_indices(slices.shape[1], height), _nearest_indices(slices.shape[2], width)
        return _pad_centre(torch.from_numpy(slices)[:, rows][:, :, cols], patch).numpy()
    images = torch.from_numpy(np.asarray(slices, dtype=np.float32))[:, None]
    return resize_images(images, patch)[:, 0].numpy()

