"""`make demo`: degrade a real brain MRI, restore and segment it, write the outputs and say what happened.

The sample is the MNI152 (ICBM 2009a) T1 template shipped inside the `nilearn` package, so a fresh
install needs no data download. The demo tells plainly whether it ran trained weights or an untrained
network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .degradations import undersample_mri
from .inference import VolumePredictor
from .intensity import fit_window, normalize, to_unit_range
from .metrics import psnr, ssim
from .results import degradation_text, modality_text
from .weights import DEFAULT_WEIGHTS

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def sample_path() -> Path:
    """The MNI152 T1 template inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError as error:
        raise FileNotFoundError("The demo sample comes with nilearn: pip install nilearn (make demo does).") from error
    path = Path(nilearn.__file__).parent / "datasets" / "data" / MNI_T1
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from this nilearn install; reinstall nilearn.")
    return path


def load_sample(slices: int) -> tuple[np.ndarray, sitk.Image]:
    """`slices` axial slices around the centre of the template, scaled to [0, 1] (S, H, W)."""
    image = sitk.ReadImage(str(sample_path()), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    centre = array.shape[0] // 2
    volume = array[centre - slices // 2 : centre - slices // 2 + slices]
    return to_unit_range(normalize(volume, fit_window(volume))), image


def degrade(volume: np.ndarray, seed: int = 0) -> np.ndarray:
    """4x Cartesian undersampling with an 8 % fully sampled centre (the evaluation protocol)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(volume)[:, None]
    return undersample_mri(x, acceleration=4.0, center_fraction=0.08, generator=generator).image[:, 0].numpy()


def load_predictor(weights: str | None) -> tuple[VolumePredictor, bool]:
    """The shipped (or given) weights; an untrained compact network, said loudly, when none exist yet."""
    if weights or DEFAULT_WEIGHTS.is_file():
        return VolumePredictor(weights, device="cpu"), True
    from .config import make_config
    from .network import VLDUN
    from .weights import ModelInfo

    torch.manual_seed(0)
    config = make_config("compact")
    info = ModelInfo(config, ["background"] + [f"class {i}" for i in range(1, config.num_classes)])
    return VolumePredictor(device="cpu", model=(VLDUN(config).eval(), info)), False


def montage(clean: np.ndarray, degraded: np.ndarray, restored: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Degraded / restored / clean / segmentation overlay of the middle slice, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(clean) // 2
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, image, title in zip(axes, (degraded[k], restored[k], clean[k]), ("degraded (4x)", "restored", "clean")):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
    axes[3].imshow(restored[k], cmap="gray", vmin=0, vmax=1)
    axes[3].imshow(np.ma.masked_equal(labels[k], 0), cmap="tab10", alpha=0.5, interpolation="nearest")
    axes[3].set_title("segmentation")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out: Path, weights: str | None = None, slices: int = 12) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    clean, reference = load_sample(slices)
    degraded = degrade(clean)
    predictor, trained = load_predictor(weights)
    prediction = predictor.predict(degraded, batch_size=4)
    restored = np.clip(prediction.restored, 0, 1)
    det = prediction.detection
    summary = {
        "sample": f"MNI152 2009a T1 template (nilearn), {slices} axial slices",
        "degradation_applied": "Cartesian k-space undersampling, acceleration 4, 8 % centre",
        "weights": str(weights or DEFAULT_WEIGHTS) if trained else "NONE: untrained network",
        "psnr_input": float(np.mean([psnr(d, c) for d, c in zip(degraded, clean)])),
        "psnr_restored": float(np.mean([psnr(r, c) for r, c in zip(restored, clean)])),
        "ssim_input": float(np.mean([ssim(d, c) for d, c in zip(degraded, clean)])),
        "ssim_restored": float(np.mean([ssim(r, c) for r, c in zip(restored, clean)])),
        "detected_modality": det.modality,
        "modality_probability": det.modality_probability,
        "detected_degradation": det.degradation,
        "degradation_probability": det.degradation_probability,
        "out_of_distribution": det.out_of_distribution,
        "segments": det.segment_names,
        "segmentation_note": det.segmentation_note,
    }
    for name, array in (("clean", clean), ("degraded", degraded), ("restored", restored), ("segmentation", prediction.labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(reference.GetSpacing())
        sitk.WriteImage(image, str(out / f"{name}.nii.gz"))
    montage(clean, degraded, restored, prediction.labels, out / "montage.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out, trained)
    return summary


def print_summary(summary: dict[str, object], out: Path, trained: bool) -> None:
    if not trained:
        print("WARNING: no trained weights were found, so this ran an UNTRAINED network with random weights.")
        print("         The pipeline ran end to end; its restoration and segmentation are meaningless.")
    print(f"Sample:      {summary['sample']}")
    print(f"Degraded by: {summary['degradation_applied']}")
    print(f"Weights:     {summary['weights']}")
    print(f"PSNR  input {summary['psnr_input']:.2f} dB -> restored {summary['psnr_restored']:.2f} dB")
    print(f"SSIM  input {summary['ssim_input']:.4f}  -> restored {summary['ssim_restored']:.4f}")
    print("Detected modality:    " + modality_text(summary["detected_modality"], summary["modality_probability"],
                                                   summary["out_of_distribution"]))
    print(f"Detected degradation: {degradation_text(summary['detected_degradation'], summary['degradation_probability'])}")
    if summary["out_of_distribution"]:
        print("Note: the scan is unlike the training data; check the results with care.")
    print(f"Segments:    {', '.join(summary['segments']) or summary['segmentation_note']}")
    print(f"Outputs in {out}/: clean, degraded, restored, segmentation (.nii.gz), montage.png, summary.json")
