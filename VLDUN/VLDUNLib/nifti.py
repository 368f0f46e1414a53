"""NIfTI integrity: ITK reads a truncated .nii or .nii.gz without complaint, so the size is checked against
the header before a file is trusted."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

NIFTI_LAYOUTS = {348: ("h", 40, 72, "f", 108), 540: ("q", 16, 14, "q", 168)}
"""Header size -> (dim type, dim offset, bitpix offset, vox_offset type, vox_offset offset) of NIfTI-1 and -2."""


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header plus voxel bytes a NIfTI-1/2 file must hold; None when the header is not NIfTI."""
    for order in "<>":
        size = struct.unpack_from(order + "i", header)[0] if len(header) >= 4 else 0
        if size not in NIFTI_LAYOUTS or len(header) < size:
            continue
        dim_type, dim_at, bitpix_at, offset_type, offset_at = NIFTI_LAYOUTS[size]
        dims = struct.unpack_from(order + 8 * dim_type, header, dim_at)
        bitpix = struct.unpack_from(order + "h", header, bitpix_at)[0]
        offset = struct.unpack_from(order + offset_type, header, offset_at)[0]
        if not 1 <= dims[0] <= 7:
            return None
        return int(offset) + math.prod(dims[1 : dims[0] + 1]) * bitpix // 8
    return None


def _decompressed_size(path: Path, expected: int) -> int:
    """Bytes a .gz file inflates to: the gzip trailer when it agrees, otherwise by inflating it all."""
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
            return expected
    size = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            size += len(chunk)
    return size


def nifti_size_problem(path: Path) -> str | None:
    """ITK reads a truncated NIfTI without complaint (the missing voxels are garbage), so check its size."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            expected = _nifti_expected_bytes(handle.read(540))
        if expected is None:
            return None
        stored = _decompressed_size(path, expected) if path.name.endswith(".gz") else path.stat().st_size
    except (OSError, EOFError, zlib.error) as error:
        return f"{path.name} is truncated or corrupt ({error}); copy it again"
    if stored < expected:
        return f"{path.name} is truncated ({stored} of {expected} bytes); copy it again"
    return None


