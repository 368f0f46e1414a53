"""Scans no VLDUN model was trained on, built from images that installed packages ship, to measure how often
the unknown-scan score flags them (`vldun calibrate-ood --unseen`).

- ``mni152``: nilearn's MNI152 T1 template, a healthy brain MRI: the modality is a training one, so it may
  rightly pass; it is reported apart (and is what the tumour-volume check segments).
- ``nilearn_maps``: nilearn's grey and white matter templates and brain/tissue masks: brain-shaped, but maps,
  not scans.
- ``natural``: skimage's photographs and scans of everyday objects, each stacked into a small volume.
- ``noise``, ``checkerboard``: synthetic volumes.
A constant volume has no contrast to normalise and is refused by `intensity.fit_window` before any score.
Volumes are (slices, rows, columns), read the way `vldun predict` reads a file where one exists.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

Volume = tuple[str, np.ndarray]


def _through_predict_reader(image) -> np.ndarray:
    """A nibabel image as `vldun predict` slices it: written to NIfTI, read with SimpleITK, cut across its thin axis."""
    import SimpleITK as sitk
    from VLDUNLib.geometry import volume_to_slices
    from VLDUNLib.predict import read_volume, slice_axis_of

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scan.nii.gz"
        image.to_filename(str(path))
        volume = read_volume(path)
        return volume_to_slices(sitk.GetArrayFromImage(volume).astype(np.float32), slice_axis_of(volume))


def mni152(resolution: int = 1) -> tuple[np.ndarray, float]:
    """The MNI152 T1 template (slices, rows, columns) and its voxel volume in mL."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=resolution)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    return _through_predict_reader(image), voxel_ml


def nilearn_maps() -> list[Volume]:
    from nilearn import datasets

    loaders: dict[str, Callable] = {
        "gm_template": datasets.load_mni152_gm_template, "wm_template": datasets.load_mni152_wm_template,
        "brain_mask": datasets.load_mni152_brain_mask, "gm_mask": datasets.load_mni152_gm_mask,
        "wm_mask": datasets.load_mni152_wm_mask,
    }
    volumes = [(name, _through_predict_reader(load(resolution=2))) for name, load in loaders.items()]
    import nibabel

    motor = nibabel.load(datasets.load_sample_motor_activation_image())
    return volumes + [("motor_activation", _through_predict_reader(motor))]


NATURAL_IMAGES = ("camera", "astronaut", "coins", "moon", "brick", "grass", "gravel", "text", "page", "rocket",
                  "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina", "horse", "clock",
                  "checkerboard", "microaneurysms", "cat")


def natural(slices: int = 8) -> list[Volume]:
    """skimage's sample images, grey, as volumes of `slices` slices shifted by a pixel each (no data download)."""
    from skimage import color, data

    volumes = []
    for name in NATURAL_IMAGES:
        image = np.asarray(getattr(data, name)(), dtype=np.float32)
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3]).astype(np.float32)
        volumes.append((name, np.stack([np.roll(image, i, axis=1) for i in range(slices)])))
    return volumes


def noise(count: int = 10, shape: tuple[int, int, int] = (12, 192, 192)) -> list[Volume]:
    """Gaussian, uniform and Rician-like (magnitude) noise volumes at several scales."""
    rng = np.random.default_rng(0)
    volumes = []
    for i in range(count):
        kind = ("gaussian", "uniform", "magnitude")[i % 3]
        if kind == "gaussian":
            volume = rng.normal(100.0 * (i + 1), 30.0, shape)
        elif kind == "uniform":
            volume = rng.uniform(-1000.0, 1000.0 * (i + 1), shape)
        else:
            volume = np.abs(rng.normal(0, 1, shape) + 1j * rng.normal(0, 1, shape)) * 50.0
        volumes.append((f"{kind}_{i}", volume.astype(np.float32)))
    return volumes


def checkerboard(shape: tuple[int, int, int] = (12, 192, 192)) -> list[Volume]:
    """Checkerboards of square sizes 2 to 64 pixels, as intensities 0/1000."""
    volumes = []
    for square in (2, 4, 8, 16, 32, 64):
        z, y, x = np.indices(shape)
        volumes.append((f"squares_{square}", (((y // square + x // square + z) % 2) * 1000.0).astype(np.float32)))
    return volumes


def unseen_sets() -> dict[str, list[Volume]]:
    """Every set of unseen volumes by name (MNI152 apart, as it is in-distribution for the modality)."""
    return {"mni152": [("mni152_t1", mni152()[0])], "nilearn_maps": nilearn_maps(), "natural": natural(),
            "noise": noise(), "checkerboard": checkerboard()}


def healthy_brain_tumour_ml(predictor, task: str = "auto") -> dict[str, object]:
    """Millilitres labelled as tumour on the healthy MNI152 T1 template with `task`: specificity on healthy anatomy.

    Any tumour class counts (the brain_tumour task's classes); with task "auto" a scan routed to another task or
    left unsegmented labels 0 mL of tumour.
    """
    volume, voxel_ml = mni152()
    prediction = predictor.predict(volume, task=task)
    detection = prediction.detection
    tumour = [s.label for s in detection.segments if s.key in {predictor.info.classes[i] for i in
                                                               predictor.info.tasks["brain_tumour"].classes}]
    voxels = int(np.isin(prediction.labels, tumour).sum()) if tumour else 0
    return {"task": task, "routed_to": detection.task, "modality": detection.modality,
            "ood_score": detection.ood_score, "unknown": detection.out_of_distribution,
            "tumour_ml": voxels * voxel_ml}
