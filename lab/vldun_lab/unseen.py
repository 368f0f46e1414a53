"""Scans no VLDUN model was trained on, built from images that installed packages ship, to measure how often
the unknown-scan score flags them (`vldun calibrate-ood --unseen`).

- ``healthy_brain``: healthy human brain MRI (nilearn's MNI152 T1 template; Colin27, ``ch2`` and its
  skull-stripped ``ch2bet``, from Debian's mricron-data). The modality is a training one, so they may rightly
  pass; they are reported apart, and they are what the tumour-volume check segments (`healthy_brain_tumour_ml`).
- ``head_ct``: a head CT (InVesalius' "ProMED CT 0051" example, Debian's invesalius-examples), as shipped and
  sparse-view degraded: CT of an anatomy the model never saw.
- ``primate_mri``: the INIA19 rhesus macaque T1 brain template (mricron-data), as shipped and undersampled.
- ``nilearn_maps``, ``brain_atlases``: nilearn's grey and white matter templates and brain/tissue masks, and
  mricron-data's label atlases (AAL, Brodmann, Harvard-Oxford, JHU, AICHA, ...): brain-shaped, but maps, not
  scans.
- ``natural``: skimage's photographs and scans of everyday objects, each stacked into a small volume.
- ``noise``, ``checkerboard``: synthetic volumes.
A constant volume has no contrast to normalise and is refused by `intensity.fit_window` before any score.
Volumes are (slices, rows, columns), read the way `vldun predict` reads a file where one exists. A set whose
Debian package is not installed is left out and `missing_packages` names it.
"""

from __future__ import annotations

import plistlib
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

Volume = tuple[str, np.ndarray]

INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
PACKAGES = {"invesalius-examples": INVESALIUS_CRANIUM, "mricron-data": MRICRON_TEMPLATES}
"""Debian packages whose images the unseen sets read: `apt install invesalius-examples mricron-data`."""

BRAIN_ATLASES = ("aal", "brodmann", "HarvardOxford-cort-maxprob-thr0-1mm", "JHU-WhiteMatter-labels-1mm",
                 "AICHAmc", "jhu189", "natbrainlab", "inia19-NeuroMaps")


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


def _voxel_ml(image) -> float:
    return float(np.prod(image.header.get_zooms()[:3])) / 1000.0


def mni152(resolution: int = 1) -> tuple[np.ndarray, float]:
    """The MNI152 T1 template (slices, rows, columns) and its voxel volume in mL."""
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=resolution)
    return _through_predict_reader(image), _voxel_ml(image)


def missing_packages() -> list[str]:
    """The Debian packages of `PACKAGES` that are not installed here (their sets are then left out)."""
    return [name for name, path in PACKAGES.items() if not path.exists()]


def mricron_template(name: str) -> tuple[np.ndarray, float]:
    """A template of mricron-data (slices, rows, columns) and its voxel volume in mL."""
    import nibabel

    image = nibabel.load(str(MRICRON_TEMPLATES / f"{name}.nii.gz"))
    return _through_predict_reader(image), _voxel_ml(image)


def healthy_brains() -> dict[str, tuple[np.ndarray, float]]:
    """Healthy human brain T1 MRI with their voxel volumes in mL: MNI152, and Colin27 where mricron-data is."""
    brains = {"mni152_t1": mni152()}
    if MRICRON_TEMPLATES.exists():
        brains.update({name: mricron_template(name) for name in ("ch2", "ch2bet")})
    return brains


def read_invesalius(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The image of an InVesalius project (.inv3: a gzipped tar of plists and raw arrays) and its (x, y, z) spacing.

    The volume is (slices, rows, columns) in the project's own dtype and values (Hounsfield units for CT).
    """
    with tarfile.open(path, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    volume = np.frombuffer(raw, dtype=matrix["dtype"]).reshape(matrix["shape"])
    return volume.astype(np.float32), tuple(float(v) for v in main["spacing"])


def head_ct() -> np.ndarray:
    """InVesalius' example head CT (108 axial slices of 256 x 256, HU), read as `vldun predict` reads a NIfTI."""
    import nibabel

    volume, spacing = read_invesalius(INVESALIUS_CRANIUM)
    image = nibabel.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), np.diag([*spacing, 1.0]))
    return _through_predict_reader(image)


def as_shipped_and_degraded(name: str, volume: np.ndarray, imaging: str) -> list[Volume]:
    """A real scan as shipped and degraded by the evaluation protocol (seeded by its name): a user's scan may be either."""
    from VLDUNLib.intensity import fit_window, normalize, to_unit_range

    from .evaluate import Protocol, case_seed, degrade_protocol

    unit = to_unit_range(normalize(volume, fit_window(volume)))
    degraded = degrade_protocol(torch.from_numpy(np.ascontiguousarray(unit))[:, None], imaging, Protocol(size=0),
                                case_seed(name, 0))[:, 0].numpy()
    return [(name, volume), (f"{name} (degraded)", degraded)]


def brain_atlases() -> list[Volume]:
    """mricron-data's label atlases as volumes of their label values."""
    return [(name, mricron_template(name)[0]) for name in BRAIN_ATLASES]


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


def unseen_sets(brains: dict[str, tuple[np.ndarray, float]] | None = None) -> dict[str, list[Volume]]:
    """Every set of unseen volumes by name ("healthy_brain" is in-distribution for the modality: report it apart);
    `brains`: `healthy_brains()` where the caller already read them."""
    brains = healthy_brains() if brains is None else brains
    sets = {"healthy_brain": [(name, volume) for name, (volume, _) in brains.items()]}
    if INVESALIUS_CRANIUM.exists():
        sets["head_ct"] = as_shipped_and_degraded("invesalius_cranium", head_ct(), "CT")
    if MRICRON_TEMPLATES.exists():
        sets["primate_mri"] = as_shipped_and_degraded("inia19_macaque_t1", mricron_template("inia19-t1-brain")[0], "MRI")
        sets["brain_atlases"] = brain_atlases()
    return sets | {"nilearn_maps": nilearn_maps(), "natural": natural(), "noise": noise(),
                   "checkerboard": checkerboard()}


def healthy_brain_tumour_ml(predictor, volume: np.ndarray, voxel_ml: float) -> dict[str, object]:
    """Millilitres labelled as tumour on a healthy brain, with the brain-tumour task forced and with task "auto".

    Specificity on healthy anatomy. One prediction with the brain-tumour task gives both: "auto" segments the same
    classes when it routes the scan to that task, and no tumour when it routes it elsewhere or leaves it unsegmented
    (an unknown scan).
    """
    prediction = predictor.predict(volume, task="brain_tumour")
    detection = prediction.detection
    tumour = [s.label for s in detection.segments]
    forced = float(np.isin(prediction.labels, tumour).sum()) * voxel_ml
    routed = predictor.detected_task(detection)
    return {"modality": detection.modality, "ood_score": detection.ood_score, "unknown": detection.out_of_distribution,
            "auto_task": routed, "tumour_ml": {"brain_tumour": forced, "auto": forced if routed == "brain_tumour" else 0.0}}
