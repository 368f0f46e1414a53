"""Memory allocator settings for VLDUN's own processes (the `vldun` commands), never for a shared one like Slicer's.

glibc hands a freed block above its mmap threshold (adaptive, at most 32 MiB) back to the system and trims the
top of its heap, so the next tensor of that size is new memory that faults in 4 KiB at a time: the `compact`
model took 45,000-96,000 minor page faults per batch of 8 slices of 256² (getrusage). Told to keep freed memory,
glibc reuses it. Measured on the 2-core Xeon: a 256x256x100 volume in 34.2, 35.5 and 34.8 s against 37.5, 42.9
and 35.0 s (alternating runs, two threads), and a batch of 8 about 6.5 % faster in four pairs of runs side by
side, one core each. The price is that the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
"""mallopt's option numbers (glibc malloc.h)."""

MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))
"""Blocks up to 32 MiB (glibc's largest threshold) come from the heap, which is trimmed only when more than
1 GiB at its top is free, and grows 256 MiB at a time (address space, not resident memory)."""


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next tensors; True where it took (Linux with glibc), else False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS)
