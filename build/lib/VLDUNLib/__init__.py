"""VL-DUN: vision-language controlled deep unfolding for joint medical image restoration and segmentation.

The library behind the VLDUN 3D Slicer extension. It never imports Qt; MRML code lives in
`mrml.py` and `logic.py` only.
"""

__version__ = "0.1.0"
