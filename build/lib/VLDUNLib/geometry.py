"""Which way a volume was sliced, and the exact (transpose-only) volume <-> slices round trip.

Pure numpy, shared by the Slicer logic (MRML nodes) and the file-based `vldun predict`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ANISOTROPY_RATIO = 1.2


def through_plane_axis(shape: Sequence[int], spacing: Sequence[float], directions: np.ndarray) -> int:
    """The numpy axis along which the volume was acquired as 2-D slices.

    `shape` and `spacing` are per numpy axis (K, J, I order for Slicer/SimpleITK arrays) and column a of
    `directions` (3x3, RAS or LPS) is the world direction of numpy axis a. Rule, in order:
    1. a single-slice (2-D) volume: the axis of size 1;
    2. anisotropic voxels: the axis whose spacing is more than `ANISOTROPY_RATIO` times both others
       (thick slices are how 2-D acquisitions look, and in-plane is where the detail is);
    3. otherwise (near-isotropic 3-D): the axis pointing closest to the patient's S axis, i.e. axial
       slices, the plane CT and the brain/lung training sets are sliced in; ties go to the first axis,
       the one the scanner wrote the slices along.
    """
    single = [axis for axis, size in enumerate(shape) if size == 1]
    if single:
        return single[0]
    thick = int(np.argmax(spacing))
    if all(spacing[thick] > ANISOTROPY_RATIO * s for axis, s in enumerate(spacing) if axis != thick):
        return thick
    superior = np.abs(np.asarray(directions, dtype=float)[2])
    return int(np.argmax(superior))


def _check_axis(array: np.ndarray, axis: int) -> None:
    if array.ndim != 3 or axis not in (0, 1, 2):
        raise ValueError(f"Expected a 3-D array and an axis in 0..2, got shape {array.shape} and axis {axis!r}.")


def volume_to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """(K, J, I) -> (S, H, W) with the slices along `axis` first; a view, no copy."""
    _check_axis(array, axis)
    return np.moveaxis(array, axis, 0)


def slices_to_volume(slices: np.ndarray, axis: int) -> np.ndarray:
    """Exact inverse of `volume_to_slices`; a view, no copy."""
    _check_axis(slices, axis)
    return np.moveaxis(slices, 0, axis)
