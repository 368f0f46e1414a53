"""PSNR/SSIM against scikit-image on real slices; Dice/IoU conventions on hand-computed examples."""

from __future__ import annotations

import math
import pathlib

import nilearn
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from VLDUNLib.degradations import gaussian_blur
from VLDUNLib.intensity import fit_window, normalize, to_unit_range
from model_factory import DATA
from VLDUNLib.metrics import CaseOverlap, OverlapCounts, confusion_counts, dice, iou, mean_defined, psnr, ssim

ACDC = DATA / "Dataset001_ACDC/imagesTr/patient001_frame01_0000.nii.gz"
MNI_T1 = pathlib.Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def unit_slice(path: pathlib.Path, index: int) -> np.ndarray:
    """One axial slice of a real volume, normalised as in training (float64 for scikit-image)."""
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return to_unit_range(normalize(volume, fit_window(volume)))[index].astype(np.float64)


@pytest.fixture(scope="module")
def clean_slices() -> dict[str, np.ndarray]:
    if not ACDC.is_file():
        pytest.skip("needs ../shared/data beside the checkout")
    return {"acdc": unit_slice(ACDC, 5), "mni": unit_slice(MNI_T1, 90)}


def degraded_versions(clean: np.ndarray) -> dict[str, np.ndarray]:
    noisy = np.clip(clean + np.random.default_rng(0).normal(0.0, 0.05, clean.shape), 0, 1)
    blurred = gaussian_blur(torch.from_numpy(clean)[None, None], 1.5).image[0, 0].numpy()
    ripple = clean + 0.1 * np.sin(np.arange(clean.size)).reshape(clean.shape)
    return {"noise": noisy, "blur": blurred, "ripple_outside_range": ripple}


def skimage_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    return structural_similarity(
        pred, target, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )


@pytest.mark.parametrize("name", ["acdc", "mni"])
def test_psnr_and_ssim_match_scikit_image_on_real_slices(clean_slices: dict[str, np.ndarray], name: str) -> None:
    clean = clean_slices[name]
    for kind, degraded in degraded_versions(clean).items():
        expected_psnr = peak_signal_noise_ratio(clean, degraded, data_range=1.0)
        expected_ssim = skimage_ssim(degraded, clean)
        assert isinstance(psnr(degraded, clean), float)
        assert psnr(degraded, clean) == pytest.approx(expected_psnr, abs=1e-4), kind
        assert ssim(degraded, clean) == pytest.approx(expected_ssim, abs=1e-4), kind
        assert 0.1 < expected_ssim < 0.999, "the degradation must matter for the comparison to mean anything"


def test_batched_float32_tensors_give_per_image_values(clean_slices: dict[str, np.ndarray]) -> None:
    clean = clean_slices["mni"]
    degraded = list(degraded_versions(clean).values())
    pred = torch.from_numpy(np.stack(degraded)[:, None]).float()
    target = torch.from_numpy(np.stack([clean] * len(degraded))[:, None]).float()
    psnrs, ssims = psnr(pred, target), ssim(pred, target)
    assert isinstance(ssims, torch.Tensor) and ssims.shape == (len(degraded),)
    for i, image in enumerate(degraded):
        assert float(psnrs[i]) == pytest.approx(peak_signal_noise_ratio(clean, image, data_range=1.0), abs=1e-4)
        assert float(ssims[i]) == pytest.approx(skimage_ssim(image, clean), abs=1e-4)
    numpy_batch = ssim(pred.numpy(), target.numpy())
    assert isinstance(numpy_batch, np.ndarray)
    np.testing.assert_allclose(numpy_batch, ssims.numpy(), atol=1e-5)


def test_data_range_scales_like_scikit_image(clean_slices: dict[str, np.ndarray]) -> None:
    clean = 255 * clean_slices["acdc"]
    noisy = clean + np.random.default_rng(1).normal(0, 8, clean.shape)
    assert psnr(noisy, clean, 255) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=255), abs=1e-4)
    expected = structural_similarity(
        noisy, clean, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(noisy, clean, 255) == pytest.approx(expected, abs=1e-4)


def test_identical_images() -> None:
    x = np.random.default_rng(2).random((32, 40))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ssim(np.zeros((2, 3, 16, 16)), np.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 32)), np.zeros((8, 32)))
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((16, 16)), np.zeros((16, 16)), data_range=0)


PRED = np.array([[1, 1, 0, 0], [0, 2, 2, 0], [0, 0, 3, 0]])
TARGET = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]])


def test_dice_and_iou_by_hand() -> None:
    # class 1: TP 1, FP 1, FN 0; class 2: TP 1, FP 1, FN 0
    assert confusion_counts(PRED, TARGET, 1) == OverlapCounts(tp=1, fp=1, fn=0)
    assert dice(PRED, TARGET, 1) == pytest.approx(2 / 3)
    assert iou(PRED, TARGET, 1) == pytest.approx(1 / 2)
    assert dice(TARGET, PRED, 2) == pytest.approx(2 / 3), "Dice is symmetric"
    assert dice(PRED, PRED, 2) == 1.0 and iou(PRED, PRED, 2) == 1.0
    # background: 7 predicted, all in the target's 10 background pixels
    assert confusion_counts(PRED, TARGET, 0) == OverlapCounts(tp=7, fp=0, fn=3)


def test_empty_class_conventions() -> None:
    assert dice(PRED, TARGET, 4) is None and iou(PRED, TARGET, 4) is None, "absent from both: no score"
    assert dice(PRED, TARGET, 3) == 0.0 and iou(PRED, TARGET, 3) == 0.0, "predicted but absent: 0"
    assert dice(TARGET, PRED, 3) == 0.0, "missed entirely: 0"


def test_torch_labels_and_shape_check() -> None:
    assert dice(torch.from_numpy(PRED), torch.from_numpy(TARGET), 1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        dice(PRED, TARGET[:2], 1)


def test_case_dice_is_3d_over_all_slices() -> None:
    """Accumulating slices equals Dice on the whole volume, which differs from the mean of slice Dice."""
    pred = np.zeros((3, 4, 4), dtype=np.uint8)
    target = np.zeros((3, 4, 4), dtype=np.uint8)
    target[0, :2, :2] = 1  # 4 voxels, found exactly
    pred[0, :2, :2] = 1
    target[1, 0, 3] = 1  # 1 voxel, missed
    pred[2, 3, 3] = 1  # 1 false positive on a slice without the class
    pred[1, :, :2] = 2
    target[1, :, :2] = 2
    case = CaseOverlap([1, 2, 3])
    for s in range(3):
        case.update(pred[s], target[s])
    assert case.counts[1] == confusion_counts(pred, target, 1) == OverlapCounts(tp=4, fp=1, fn=1)
    assert case.dice() == {1: pytest.approx(8 / 10), 2: 1.0, 3: None}
    assert case.iou()[1] == pytest.approx(4 / 6)
    assert case.mean_dice() == pytest.approx((0.8 + 1.0) / 2), "class 3 is absent from both: left out"
    slice_mean = mean_defined(dice(pred[s], target[s], 1) for s in range(3))
    assert slice_mean == pytest.approx((1.0 + 0.0 + 0.0) / 3) != case.dice()[1]


def test_mean_defined_and_case_overlap_validation() -> None:
    assert mean_defined([None, 0.5, 1.0]) == 0.75
    assert mean_defined([None, None]) is None
    assert CaseOverlap([1]).mean_dice() is None, "a case with no class anywhere has no score"
    with pytest.raises(ValueError, match="background"):
        CaseOverlap([0, 1])
