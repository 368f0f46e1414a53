"""Properties of the VL-DUN degradation model (Eq. (1), Eq. (5)) and its visual primitives."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable

import pytest
import torch

from VLDUNLib import degradations as deg
from VLDUNLib.degradations import DEGRADATIONS, Degraded

MNI_T1 = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
"""Inside the nilearn package; read by the `brain` fixture only, so the GPU checks below need neither package."""


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psnr(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / torch.mean((estimate - reference) ** 2).item())


def high_frequency_energy(x: torch.Tensor) -> float:
    """Energy of k-space outside the central half of each axis."""
    k = deg.fft2c(x).abs() ** 2
    h, w = x.shape[-2:]
    k[..., h // 4 : h - h // 4, w // 4 : w - w // 4] = 0
    return k.sum().item()


@pytest.fixture(scope="module")
def brain() -> torch.Tensor:
    """Axial slice of the MNI152 T1 template scaled to [0, 1], shape (1, 1, 233, 197)."""
    nilearn = pytest.importorskip("nilearn")
    sitk = pytest.importorskip("SimpleITK")
    path = pathlib.Path(nilearn.__file__).parent / MNI_T1
    volume = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype("float32"))
    axial = volume[volume.shape[0] // 2]
    return ((axial - axial.min()) / (axial.max() - axial.min()))[None, None]


RANDOM_IMAGE_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], Degraded]] = {
    "undersample_random": lambda x, g: deg.undersample_mri(x, 4.0, generator=g),
    "undersample_equispaced": lambda x, g: deg.undersample_mri(x, 4.0, pattern="equispaced", generator=g),
    "sparse_view_ct": lambda x, g: deg.sparse_view_ct(x, 30, generator=g),
    "gaussian_noise": lambda x, g: deg.gaussian_noise(x, 0.05, generator=g),
    "rician_noise": lambda x, g: deg.rician_noise(x, 0.05, generator=g),
    "motion": lambda x, g: deg.motion(x, 4.0, generator=g),
    "random_mri": lambda x, g: deg.random_degradation(x, "MRI", g),
    "random_ct": lambda x, g: deg.random_degradation(x, "CT", g),
    "protocol_mri": lambda x, g: deg.random_degradation(x, "MRI", g, primitives=False),
    "protocol_ct": lambda x, g: deg.random_degradation(x, "CT", g, primitives=False),
}

IMAGE_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], Degraded]] = {
    **RANDOM_IMAGE_FUNCTIONS,
    "gaussian_blur": lambda x, g: deg.gaussian_blur(x, 1.5),
    "defocus_blur": lambda x, g: deg.defocus_blur(x, 3.0),
    "low_resolution": lambda x, g: deg.low_resolution(x, 3.0),
}

MASKS: dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    "cartesian_random": lambda g: deg.cartesian_mask(2, 64, 48, 4.0, generator=g),
    "cartesian_equispaced": lambda g: deg.cartesian_mask(2, 64, 48, 4.0, pattern="equispaced", generator=g),
    "radial": lambda g: deg.radial_mask(2, 64, 48, 20, generator=g),
}


def test_degradation_names_and_labels() -> None:
    assert DEGRADATIONS == ("noise", "blur", "motion", "low_resolution", "undersampling", "sparse_view")
    x = torch.rand(1, 1, 16, 16)
    results = [
        ("undersampling", deg.undersample_mri(x)),
        ("sparse_view", deg.sparse_view_ct(x)),
        ("noise", deg.gaussian_noise(x, 0.1)),
        ("noise", deg.rician_noise(x, 0.1)),
        ("blur", deg.gaussian_blur(x, 1.0)),
        ("blur", deg.defocus_blur(x, 2.0)),
        ("motion", deg.motion(x, 2.0)),
        ("low_resolution", deg.low_resolution(x, 2.0)),
    ]
    for name, result in results:
        image, label = result
        assert isinstance(result, Degraded) and image.shape == x.shape
        assert label == DEGRADATIONS.index(name), name


@pytest.mark.parametrize("shape", [(16, 16), (37, 53)])
def test_centred_fft_is_orthonormal_and_centred(shape: tuple[int, int]) -> None:
    x = torch.rand(2, 1, *shape, dtype=torch.float64)
    k = deg.fft2c(x)
    torch.testing.assert_close(deg.ifft2c(k).real, x)
    torch.testing.assert_close(k.abs().pow(2).sum(), x.pow(2).sum())
    h, w = shape
    torch.testing.assert_close(k[..., h // 2, w // 2].real, x.sum(dim=(-2, -1)) / math.sqrt(h * w))


@pytest.mark.parametrize("magnitude", [True, False])
@pytest.mark.parametrize("shape", [(32, 32), (37, 53)])
def test_full_mask_is_identity(magnitude: bool, shape: tuple[int, int]) -> None:
    x = torch.rand(2, 1, *shape)
    full = deg.cartesian_mask(2, *shape, acceleration=1.0, generator=seeded(0))
    assert torch.all(full == 1)
    for mask in (full, torch.ones(shape)):
        torch.testing.assert_close(deg.kspace_undersample(x, mask, magnitude), x, atol=1e-5, rtol=0)


def test_magnitude_mode_is_non_negative_and_real_mode_is_linear(brain: torch.Tensor) -> None:
    mask = deg.radial_mask(1, *brain.shape[-2:], spokes=30, generator=seeded(22))
    magnitude = deg.kspace_undersample(brain, mask, magnitude=True)
    real = deg.kspace_undersample(brain, mask, magnitude=False)
    assert torch.all(magnitude >= 0) and real.min() < -1e-3, "streaks undershoot only in the real image"
    other = torch.rand(brain.shape, generator=seeded(23)) - 0.5
    combined = deg.kspace_undersample(2 * brain + other, mask, magnitude=False)
    expected = 2 * real + deg.kspace_undersample(other, mask, magnitude=False)
    torch.testing.assert_close(combined, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pattern", ["random", "equispaced"])
@pytest.mark.parametrize("acceleration", [2.0, 4.0, 8.0])
def test_cartesian_mask_fraction_and_centre(acceleration: float, pattern: str) -> None:
    height, width = 256, 40
    mask = deg.cartesian_mask(3, height, width, acceleration, 0.08, pattern, seeded(1))
    assert mask.shape == (3, 1, height, width) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    rows = mask[:, 0, :, 0]
    assert torch.equal(mask, rows[:, None, :, None].expand_as(mask)), "whole k-space rows must be sampled"
    assert rows.sum(dim=1).tolist() == [round(height / acceleration)] * 3
    centre = round(0.08 * height)
    start = height // 2 - centre // 2
    assert torch.all(rows[:, start : start + centre] == 1)
    assert not torch.equal(rows[0], rows[1]), "each sample needs its own mask"


def test_cartesian_mask_keeps_dc_row_for_odd_height_and_tiny_centre() -> None:
    mask = deg.cartesian_mask(4, 37, 53, 16.0, center_fraction=0.0, generator=seeded(2))
    assert torch.all(mask[:, 0, 37 // 2, :] == 1)
    assert mask[:, 0, :, 0].sum(dim=1).tolist() == [2.0] * 4


@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (8, 8)])
def test_radial_mask_always_keeps_dc(shape: tuple[int, int]) -> None:
    h, w = shape
    for seed in range(5):
        mask = deg.radial_mask(3, h, w, spokes=1 + seed * 7, generator=seeded(seed))
        assert mask.shape == (3, 1, h, w)
        assert torch.all(mask[:, 0, h // 2, w // 2] == 1)


def test_radial_mask_density_grows_with_spokes() -> None:
    masks = [deg.radial_mask(2, 256, 256, spokes, generator=seeded(3)) for spokes in (10, 30, 60, 120)]
    fractions = [mask.mean().item() for mask in masks]
    assert fractions == sorted(fractions) and len(set(fractions)) == 4
    assert fractions[2] < 0.4
    pair = deg.radial_mask(2, 64, 64, 10, generator=seeded(3))
    assert not torch.equal(pair[0], pair[1]), "each sample needs its own rotation"


def test_radial_spoke_has_no_gaps() -> None:
    height, width = 64, 80
    mask = deg.radial_mask(4, height, width, spokes=1, generator=seeded(4))[:, 0]
    rows = torch.arange(height)[:, None] - height // 2
    cols = torch.arange(width)[None, :] - width // 2
    ring = torch.maximum(rows.abs(), cols.abs())
    for distance in range(1, height // 2):
        hits = mask[:, ring == distance].sum(dim=1)
        assert torch.all(hits >= 2), f"spoke broken at Chebyshev distance {distance}"


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_are_seed_reproducible(name: str) -> None:
    make = MASKS[name]
    assert torch.equal(make(seeded(5)), make(seeded(5)))
    assert not torch.equal(make(seeded(5)), make(seeded(6)))


@pytest.mark.parametrize("name", list(RANDOM_IMAGE_FUNCTIONS))
def test_random_degradations_are_seed_reproducible(name: str) -> None:
    apply = RANDOM_IMAGE_FUNCTIONS[name]
    x = torch.rand(2, 1, 32, 40, generator=seeded(0))
    first, again, other = apply(x, seeded(7)), apply(x, seeded(7)), apply(x, seeded(8))
    assert torch.equal(first.image, again.image) and first.label == again.label
    assert not torch.equal(first.image, other.image)


def test_gaussian_noise_has_requested_std() -> None:
    x = torch.full((1, 1, 256, 256), 0.5)
    y = deg.gaussian_noise(x, 0.05, generator=seeded(9)).image
    assert abs(y.std().item() - 0.05) < 0.05 * 0.05
    assert abs(y.mean().item() - 0.5) < 1e-3


def test_rician_noise_on_zero_image_is_rayleigh() -> None:
    sigma = 0.08
    y = deg.rician_noise(torch.zeros(1, 1, 256, 256), sigma, generator=seeded(10)).image
    assert torch.all(y >= 0)
    assert y.mean().item() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.02)


def test_noise_draws_differ_across_the_batch() -> None:
    y = deg.gaussian_noise(torch.zeros(2, 1, 16, 16), 0.1, generator=seeded(11)).image
    assert not torch.equal(y[0], y[1])


@pytest.mark.parametrize(
    "blur",
    [lambda x: deg.gaussian_blur(x, 1.5), lambda x: deg.defocus_blur(x, 3.0)],
    ids=["gaussian", "defocus"],
)
def test_blur_keeps_constants_and_removes_high_frequencies(blur, brain: torch.Tensor) -> None:
    constant = torch.full((1, 1, 37, 53), 0.3)
    torch.testing.assert_close(blur(constant).image, constant)
    assert high_frequency_energy(blur(brain).image) < 0.2 * high_frequency_energy(brain)


def test_zero_blur_is_identity() -> None:
    x = torch.rand(2, 1, 21, 18)
    torch.testing.assert_close(deg.gaussian_blur(x, 0.0).image, x)
    torch.testing.assert_close(deg.defocus_blur(x, 0.0).image, x)


def test_stronger_blur_removes_more() -> None:
    x = torch.rand(1, 1, 64, 64, generator=seeded(12))
    energies = [high_frequency_energy(deg.gaussian_blur(x, sigma).image) for sigma in (0.5, 1.0, 2.0)]
    assert energies == sorted(energies, reverse=True)


def test_low_resolution_keeps_shape_and_loses_detail(brain: torch.Tensor) -> None:
    y = deg.low_resolution(brain, 4.0).image
    assert y.shape == brain.shape
    assert high_frequency_energy(y) < 0.2 * high_frequency_energy(brain)
    torch.testing.assert_close(deg.low_resolution(brain, 1.0).image, brain)


def test_motion_changes_phase_not_kspace_magnitude(brain: torch.Tensor) -> None:
    y = deg.motion(brain, 6.0, generator=seeded(13)).image
    k_clean, k_moved = deg.fft2c(brain).abs(), deg.fft2c(y).abs()
    assert (y - brain).norm() > 0.01 * brain.norm()
    torch.testing.assert_close(k_moved.norm(), k_clean.norm(), rtol=1e-4, atol=0)
    assert (k_moved - k_clean).norm() < 0.1 * k_clean.norm()
    torch.testing.assert_close(deg.motion(brain, 0.0, generator=seeded(13)).image, brain, atol=1e-5, rtol=0)


def test_undersampling_lowers_psnr_more_at_higher_acceleration(brain: torch.Tensor) -> None:
    psnrs = [psnr(deg.undersample_mri(brain, a, generator=seeded(14)).image, brain) for a in (2.0, 4.0, 8.0)]
    assert psnrs[1] < 40.0
    assert psnrs == sorted(psnrs, reverse=True)


def test_sparse_view_lowers_psnr_more_with_fewer_spokes(brain: torch.Tensor) -> None:
    psnrs = [psnr(deg.sparse_view_ct(brain, spokes, generator=seeded(15)).image, brain) for spokes in (120, 60, 30)]
    assert psnrs[1] < 40.0
    assert psnrs == sorted(psnrs, reverse=True)


def test_random_degradation_covers_protocol_and_primitives() -> None:
    x = torch.rand(2, 1, 24, 24)
    labels = {deg.random_degradation(x, "MRI", seeded(seed)).label for seed in range(40)}
    assert labels == {DEGRADATIONS.index(n) for n in (*deg.PRIMITIVES, "undersampling")}
    labels_ct = {deg.random_degradation(x, "CT", seeded(seed)).label for seed in range(40)}
    assert labels_ct == {DEGRADATIONS.index(n) for n in (*deg.PRIMITIVES, "sparse_view")}
    for modality, name in (("MRI", "undersampling"), ("CT", "sparse_view")):
        protocol = {deg.random_degradation(x, modality, seeded(seed), primitives=False).label for seed in range(5)}
        assert protocol == {DEGRADATIONS.index(name)}


def test_balanced_draws_give_every_degradation_a_fifth() -> None:
    """The prior's classes are balanced only with `balanced`; by default the protocol is half the draws."""
    x = torch.rand(1, 1, 16, 16)
    for modality, protocol in (("MRI", "undersampling"), ("CT", "sparse_view")):
        balanced = [deg.random_degradation(x, modality, seeded(s), balanced=True).label for s in range(400)]
        counts = torch.bincount(torch.tensor(balanced), minlength=len(DEGRADATIONS)).float() / len(balanced)
        for name in (*deg.PRIMITIVES, protocol):
            assert 0.14 < counts[DEGRADATIONS.index(name)] < 0.26, (modality, name, counts)
        default = [deg.random_degradation(x, modality, seeded(s)).label for s in range(400)]
        share = sum(label == DEGRADATIONS.index(protocol) for label in default) / len(default)
        assert 0.43 < share < 0.57


@pytest.mark.parametrize("name", list(IMAGE_FUNCTIONS))
def test_odd_size_float64_input_untouched(name: str) -> None:
    x = torch.rand(2, 1, 37, 53, dtype=torch.float64, generator=seeded(16))
    before = x.clone()
    y = IMAGE_FUNCTIONS[name](x, seeded(17)).image
    assert y.shape == x.shape and y.dtype == torch.float64 and y.device == x.device
    assert torch.isfinite(y).all()
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", list(IMAGE_FUNCTIONS))
def test_differentiable_and_no_grad(name: str) -> None:
    x = torch.rand(1, 1, 16, 20, generator=seeded(18)).requires_grad_()
    IMAGE_FUNCTIONS[name](x, seeded(19)).image.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not IMAGE_FUNCTIONS[name](x, seeded(19)).image.requires_grad


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: deg.cartesian_mask(1, 32, 32, 0.5), "acceleration"),
        (lambda: deg.undersample_mri(torch.rand(1, 1, 32, 32), acceleration=17.0), "acceleration"),
        (lambda: deg.cartesian_mask(1, 32, 32, 4.0, center_fraction=1.5), "center_fraction"),
        (lambda: deg.cartesian_mask(1, 32, 32, 4.0, pattern="spiral"), "pattern"),
        (lambda: deg.radial_mask(1, 32, 32, 0), "spokes"),
        (lambda: deg.sparse_view_ct(torch.rand(1, 1, 32, 32), spokes=0), "spokes"),
        (lambda: deg.gaussian_noise(torch.rand(1, 1, 8, 8), -0.1), "sigma"),
        (lambda: deg.rician_noise(torch.rand(1, 1, 8, 8), float("nan")), "sigma"),
        (lambda: deg.gaussian_blur(torch.rand(1, 1, 8, 8), -1.0), "sigma"),
        (lambda: deg.defocus_blur(torch.rand(1, 1, 8, 8), -1.0), "radius"),
        (lambda: deg.motion(torch.rand(1, 1, 8, 8), -1.0), "severity"),
        (lambda: deg.low_resolution(torch.rand(1, 1, 8, 8), 0.5), "factor"),
        (lambda: deg.gaussian_noise(torch.rand(8, 8), 0.1), r"shape \(B, 1, H, W\)"),
        (lambda: deg.motion(torch.rand(1, 8, 8), 1.0), r"shape \(B, 1, H, W\)"),
        (lambda: deg.gaussian_blur(torch.ones(1, 1, 8, 8, dtype=torch.int64), 1.0), "floating-point"),
        (lambda: deg.kspace_undersample(torch.rand(2, 1, 8, 8), torch.ones(8, 9), True), "mask"),
        (lambda: deg.random_degradation(torch.rand(1, 1, 8, 8), "PET", seeded(0)), "modality"),
    ],
)
def test_invalid_arguments_raise_helpful_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(IMAGE_FUNCTIONS))
def test_cuda_matches_cpu_with_cpu_generator(name: str) -> None:
    x = torch.rand(2, 1, 37, 53, generator=seeded(20))
    on_cpu = IMAGE_FUNCTIONS[name](x, seeded(21))
    on_cuda = IMAGE_FUNCTIONS[name](x.cuda(), seeded(21))
    assert on_cuda.image.is_cuda and on_cuda.label == on_cpu.label
    torch.testing.assert_close(on_cuda.image.cpu(), on_cpu.image, atol=1e-4, rtol=1e-4)
