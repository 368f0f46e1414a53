"""The one intensity normalisation: window choice on real CT/MRI data, exact inverse, clipping."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from VLDUNLib.intensity import IntensityWindow, denormalize, fit_window, normalize, to_unit_range

from model_factory import DATA
VOLUMES = {
    "AbdomenCT": DATA / "Dataset004_AbdomenCT/imagesTr/totalseg_example_ct_sm_0000.nii.gz",
    "ACDC": DATA / "Dataset001_ACDC/imagesTr/patient001_frame01_0000.nii.gz",
    "BraTS_T1c": DATA / "Dataset002_BraTS2015/imagesTr/brats_2013_pat0001_1_0000.nii.gz",
    "BraTS_FLAIR": DATA / "Dataset002_BraTS2015/imagesTr/brats_2013_pat0001_1_0001.nii.gz",
    "COVID": DATA / "Dataset003_COVID19CT/imagesTr/covid_000_0000.nii.gz",
}


def read(name: str) -> np.ndarray:
    if not VOLUMES[name].is_file():
        pytest.skip("needs ../shared/data beside the checkout")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(VOLUMES[name])))


def test_hounsfield_ct_gets_the_fixed_ct_window() -> None:
    assert fit_window(read("AbdomenCT")) == IntensityWindow("ct_hu", -1000.0, 1000.0)


@pytest.mark.parametrize("name", ["ACDC", "BraTS_T1c", "BraTS_FLAIR", "COVID"])
def test_mri_and_windowed_ct_get_robust_percentiles(name: str) -> None:
    volume = read(name)
    window = fit_window(volume)
    assert window.kind == "percentile"
    low, high = np.percentile(volume, [0.5, 99.5])
    tolerance = 0.01 * (high - low)  # BraTS has 9 M voxels: its window comes from a 1 M-voxel sample
    assert window.low == pytest.approx(low, abs=tolerance) and window.high == pytest.approx(high, abs=tolerance)


def test_scaled_hu_volume_is_not_mistaken_for_ct() -> None:
    """The same CT shifted to positive values (raw detector numbers) has no air below -500."""
    volume = read("AbdomenCT") + 1024
    assert fit_window(volume).kind == "percentile"


def test_nan_and_inf_are_ignored_when_fitting() -> None:
    volume = read("ACDC").copy()
    clean = fit_window(volume)
    volume[0, :5] = np.nan
    volume[1, :5] = np.inf
    volume[2, :5] = -np.inf
    dirty = fit_window(volume)
    assert dirty.kind == "percentile"
    finite = volume[np.isfinite(volume)]
    assert (dirty.low, dirty.high) == pytest.approx(tuple(np.percentile(finite, [0.5, 99.5])))
    assert dirty.high == pytest.approx(clean.high, rel=0.05)


def test_mostly_empty_volume_falls_back_to_min_max() -> None:
    volume = np.zeros((4, 32, 32), dtype=np.float32)
    volume[0, 0, :3] = [5.0, 7.0, 9.0]
    assert fit_window(volume) == IntensityWindow("percentile", 0.0, 9.0)


@pytest.mark.parametrize("volume", [np.full((3, 8, 8), 4.5), np.full((2, 4, 4), np.nan), np.zeros((0, 4, 4))])
def test_constant_or_empty_volume_raises_naming_the_fix(volume: np.ndarray) -> None:
    with pytest.raises(ValueError, match="check that the right file"):
        fit_window(volume)


def test_non_numeric_volume_raises() -> None:
    with pytest.raises(ValueError, match="real numeric"):
        fit_window(np.ones((2, 2), dtype=bool))


def test_fit_is_cheap_and_deterministic_on_a_512x512x300_ct() -> None:
    volume = np.full((300, 512, 512), -1000, dtype=np.int16)
    volume[:, 100:400, 120:380] = 40
    volume[:, 240:260, 200:300] = 900
    start = time.perf_counter()
    window = fit_window(volume)
    assert time.perf_counter() - start < 2.0
    assert window == fit_window(volume) == IntensityWindow("ct_hu", -1000.0, 1000.0)
    mri = volume.astype(np.float32) + 1000
    assert fit_window(mri) == fit_window(mri)


def test_normalize_is_linear_without_clipping() -> None:
    window = IntensityWindow("ct_hu", -1000.0, 1000.0)
    hu = np.array([-1000.0, 0.0, 1000.0, 3000.0, -2000.0])
    np.testing.assert_allclose(normalize(hu, window), [0.0, 0.5, 1.0, 2.0, -0.5], atol=1e-7)
    np.testing.assert_allclose(to_unit_range(normalize(hu, window)), [0.0, 0.5, 1.0, 1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("name", ["AbdomenCT", "BraTS_FLAIR", "COVID"])
def test_real_volumes_round_trip(name: str) -> None:
    volume = read(name)
    window = fit_window(volume)
    unit = normalize(volume, window)
    assert unit.dtype == np.float32
    width = window.high - window.low
    np.testing.assert_allclose(denormalize(unit, window), volume, rtol=0, atol=1e-5 * width)


@settings(max_examples=60, deadline=None)
@given(
    width=st.floats(1e-2, 1e4),
    offset=st.floats(-100.0, 100.0),
    unit=st.lists(st.floats(-2.0, 3.0), min_size=1, max_size=20),
)
def test_denormalize_is_the_exact_inverse(width: float, offset: float, unit: list[float]) -> None:
    """Exact to 1e-5 of the window for windows at most 100 widths from 0 (float32 carries 7 digits)."""
    window = IntensityWindow("percentile", offset * width, (offset + 1) * width)
    x01 = np.asarray(unit, dtype=np.float32)
    np.testing.assert_allclose(normalize(denormalize(x01, window), window), x01, rtol=0, atol=1e-5)
    x = denormalize(x01, window)
    np.testing.assert_allclose(denormalize(normalize(x, window), window), x, rtol=0, atol=1e-5 * width)


def test_torch_matches_numpy_and_keeps_inputs() -> None:
    volume = read("COVID")
    window = fit_window(volume)
    before = volume.copy()
    tensor = torch.from_numpy(volume.astype(np.int16))
    out = normalize(tensor, window)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), normalize(volume, window), atol=1e-6)
    restored = denormalize(out, window)
    assert isinstance(restored, torch.Tensor) and restored.dtype == torch.float32
    clipped = to_unit_range(out * 3 - 1)
    assert clipped.min() == 0 and clipped.max() == 1
    np.testing.assert_array_equal(volume, before)
    assert torch.equal(tensor, torch.from_numpy(before.astype(np.int16)))


def test_window_serialises_and_rejects_bad_values() -> None:
    window = IntensityWindow("percentile", -1.5, 2.25)
    assert IntensityWindow.from_dict(window.to_dict()) == window
    with pytest.raises(ValueError, match="low < high"):
        IntensityWindow("percentile", 1.0, 1.0)
    with pytest.raises(ValueError, match="kind"):
        IntensityWindow("z_score", 0.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys"):
        IntensityWindow.from_dict({"kind": "ct_hu", "low": 0.0})
    with pytest.raises(ValueError, match="IntensityWindow"):
        normalize(np.zeros(3), (0.0, 1.0))  # type: ignore[arg-type]


def test_restoration_adds_the_correction_inside_the_window_and_keeps_the_rest():
    from VLDUNLib.intensity import IntensityWindow, restore_outside_window

    window = IntensityWindow("ct_hu", -1000.0, 1000.0)
    original = np.array([-1024.0, 0.0, 500.0, 3000.0], np.float32)
    unit = to_unit_range(normalize(original, window))
    restored = restore_outside_window(original, unit, unit + 0.01, window)
    np.testing.assert_allclose(restored, [-1024.0, 20.0, 520.0, 3000.0], rtol=0, atol=1e-3)
