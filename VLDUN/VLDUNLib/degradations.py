"""Degradation model of VL-DUN: y = Phi x + n (Eq. (1) of the paper).

Training pairs are synthesised on the fly from clean images. The paper's protocol is Fourier
undersampling, Eq. (5): a Cartesian k-space mask for MRI and a radial mask for sparse-view CT
(radial lines through the k-space origin, by the Fourier slice theorem). The primitives noise,
blur, motion and low resolution are the labels the CLIP degradation prior is tuned on.

Conventions shared by every image function:
- images are real tensors of shape (B, 1, H, W), normalised to roughly [0, 1]; outputs are never
  clipped, so noise and interpolation overshoot stay visible to the networks;
- the input is never modified and the output keeps its dtype and device; everything is
  differentiable;
- randomness comes only from the explicit ``generator``: numbers are drawn on the CPU and then
  moved to the image's device, so a CPU generator reproduces the same result on CUDA as well,
  and every sample of a batch gets its own draw;
- k-space is the centred orthonormal 2D FFT (``fft2c``): the DC term sits at (H // 2, W // 2),
  rows of k-space are phase-encode lines and columns are the readout direction.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .config import DEGRADATIONS

PRIMITIVES: tuple[str, ...] = DEGRADATIONS[:4]
MAX_ACCELERATION = 16.0


class Degraded(NamedTuple):
    """A degraded image and its label, the index of its kind in ``DEGRADATIONS``."""

    image: torch.Tensor
    label: int


def _label(name: str) -> int:
    """Labels are positions in DEGRADATIONS so the CLIP prompts can be listed in the same order."""
    return DEGRADATIONS.index(name)


def _check_image(x: torch.Tensor) -> None:
    """Fail early with a fix instead of letting FFTs or convolutions fail obscurely."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, 1, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"x must have shape (B, 1, H, W), got shape {tuple(x.shape)}; "
            "add missing batch/channel axes, e.g. x[None, None] for a single 2D image"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"x must be a real floating-point tensor, got dtype {x.dtype}; convert it with x.float()"
        )


def _check_non_negative(name: str, value: float) -> None:
    """Severities are magnitudes; a negative or non-finite one is always a caller's mistake."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    """Sizes and counts must be positive integers for masks to be well defined."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """One scalar draw from the explicit generator, so severities are seed-reproducible."""
    return low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64).item()


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """One integer in [low, high] (inclusive) from the explicit generator."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes: DC at (H // 2, W // 2), energy preserved."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of ``fft2c`` (also valid for odd sizes, where fftshift and ifftshift differ)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), norm="ortho"), dim=dims)


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> None:
    """A mask must broadcast sample-wise onto x, or Eq. (5) would silently mix samples."""
    batch, _, height, width = x.shape
    if tuple(mask.shape) not in {(height, width), (1, 1, height, width), (batch, 1, height, width)}:
        raise ValueError(
            f"mask must have shape ({height}, {width}) or ({batch}, 1, {height}, {width}) to match x, "
            f"got {tuple(mask.shape)}; build it with cartesian_mask or radial_mask"
        )


def kspace_undersample(x: torch.Tensor, mask: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """Eq. (5) of the paper: y = F^-1(M * F(x)), undersampling the image's k-space with mask M.

    MRI scanners display magnitude images, so ``magnitude=True`` returns |y|; CT images are real
    attenuation maps, so ``magnitude=False`` returns Re(y).
    """
    _check_image(x)
    _check_mask(mask, x)
    sampled = fft2c(x) * mask.to(device=x.device, dtype=x.dtype)
    y = ifft2c(sampled)
    return y.abs() if magnitude else y.real


def _check_acceleration(acceleration: float, center_fraction: float) -> None:
    """Accelerations beyond 16 leave too few lines to be a plausible clinical protocol."""
    if not 1.0 <= acceleration <= MAX_ACCELERATION:
        raise ValueError(
            f"acceleration must be in [1, {MAX_ACCELERATION:g}], got {acceleration!r}; "
            "use 1 for a fully sampled k-space"
        )
    if not 0.0 <= center_fraction <= 1.0:
        raise ValueError(f"center_fraction must be in [0, 1], got {center_fraction!r}")


def _outer_rows(
    batch: int, outer: torch.Tensor, count: int, pattern: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick ``count`` of the non-centre rows per sample, either at random or equally spaced."""
    if pattern == "random":
        order = torch.rand(batch, outer.numel(), generator=generator).argsort(dim=1)
        return outer[order[:, :count]]
    step = outer.numel() / max(count, 1)
    offset = torch.rand(batch, 1, generator=generator, dtype=torch.float64) * step
    positions = (offset + step * torch.arange(count, dtype=torch.float64)).floor().long()
    return outer[positions]


def cartesian_mask(
    batch: int,
    height: int,
    width: int,
    acceleration: float,
    center_fraction: float = 0.08,
    pattern: Literal["random", "equispaced"] = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Cartesian MRI sampling mask (B, 1, H, W) of 0/1 floats, one random mask per sample.

    Whole rows (phase-encode lines) are kept or dropped, as an accelerated scan skips phase
    encodes. A block of round(center_fraction * H) centre rows (at least the DC row) is always
    sampled because it holds the image contrast; the other rows are added until round(H /
    acceleration) rows are sampled in total.
    """
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        _check_positive_int(name, value)
    _check_acceleration(acceleration, center_fraction)
    if pattern not in ("random", "equispaced"):
        raise ValueError(f"pattern must be 'random' or 'equispaced', got {pattern!r}")
    total = max(1, round(height / acceleration))
    centre = min(total, max(1, round(center_fraction * height)))
    start = height // 2 - centre // 2
    is_centre = torch.zeros(height, dtype=torch.bool)
    is_centre[start : start + centre] = True
    rows = torch.zeros(batch, height)
    rows[:, is_centre] = 1.0
    chosen = _outer_rows(batch, torch.nonzero(~is_centre).flatten(), total - centre, pattern, generator)
    rows.scatter_(1, chosen, 1.0)
    return rows[:, None, :, None].expand(batch, 1, height, width).contiguous().to(device)


def radial_mask(
    batch: int,
    height: int,
    width: int,
    spokes: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radial sparse-view CT mask (B, 1, H, W): ``spokes`` lines through the k-space centre.

    By the Fourier slice theorem each parallel-beam view is one line through the origin of
    k-space, so ``spokes`` views over 180 degrees are equally spaced lines with a random
    rotation per sample. Lines are traced at half-pixel steps in pixel units, so they have no
    gaps, and every line passes through the DC term.
    """
    for name, value in (("batch", batch), ("height", height), ("width", width), ("spokes", spokes)):
        _check_positive_int(name, value)
    rotation = torch.rand(batch, 1, generator=generator, dtype=torch.float64)
    angles = (rotation + torch.arange(spokes, dtype=torch.float64)) * (math.pi / spokes)
    reach = math.ceil(math.hypot(height, width))
    radii = 0.5 * torch.arange(-reach, reach + 1, dtype=torch.float64)
    rows = torch.round(height // 2 + radii * angles.sin()[..., None]).long()
    cols = torch.round(width // 2 + radii * angles.cos()[..., None]).long()
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    sample = torch.arange(batch)[:, None, None].expand_as(rows)
    mask = torch.zeros(batch, height * width)
    mask[sample[inside], (rows * width + cols)[inside]] = 1.0
    return mask.view(batch, 1, height, width).to(device)


def undersample_mri(
    x: torch.Tensor,
    acceleration: float = 4.0,
    center_fraction: float = 0.08,
    pattern: Literal["random", "equispaced"] = "random",
    generator: torch.Generator | None = None,
) -> Degraded:
    """Accelerated MRI: Eq. (5) with a Cartesian mask, giving aliased magnitude images."""
    _check_image(x)
    batch, _, height, width = x.shape
    mask = cartesian_mask(batch, height, width, acceleration, center_fraction, pattern, generator, x.device)
    return Degraded(kspace_undersample(x, mask, magnitude=True), _label("undersampling"))


def sparse_view_ct(x: torch.Tensor, spokes: int = 60, generator: torch.Generator | None = None) -> Degraded:
    """Sparse-view CT: Eq. (5) with a radial mask, giving streak artefacts in a real image."""
    _check_image(x)
    batch, _, height, width = x.shape
    mask = radial_mask(batch, height, width, spokes, generator, x.device)
    return Degraded(kspace_undersample(x, mask, magnitude=False), _label("sparse_view"))


def _standard_normal(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise shaped like x, drawn on the CPU so a CPU generator also serves CUDA images."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> Degraded:
    """Eq. (1) of the paper with Phi = I: y = x + n, n ~ N(0, sigma^2 I).

    ``sigma`` is in units of the [0, 1] intensity range.
    """
    _check_image(x)
    _check_non_negative("sigma", sigma)
    return Degraded(x + sigma * _standard_normal(x, generator), _label("noise"))


def rician_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> Degraded:
    """MRI noise: Eq. (1) on the complex signal, y = |x + n1 + i n2|, then the magnitude.

    Magnitude MR images carry Rician rather than Gaussian noise (Rayleigh in the background),
    which biases dark regions upwards; ``sigma`` is per channel, in [0, 1] intensity units.
    """
    _check_image(x)
    _check_non_negative("sigma", sigma)
    real = x + sigma * _standard_normal(x, generator)
    imaginary = sigma * _standard_normal(x, generator)
    return Degraded(torch.hypot(real, imaginary), _label("noise"))


def _convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 2D filtering with edge replication, so a constant image stays constant."""
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    pad_h, pad_w = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    weight = kernel.expand(x.shape[1], 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=x.shape[1])


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Pixel-integrated Gaussian over +-3 sigma; integration keeps sigma = 0 well defined (identity)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    profile = torch.special.ndtr((offsets + 0.5) / sigma) - torch.special.ndtr((offsets - 0.5) / sigma)
    kernel = torch.outer(profile, profile)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> Degraded:
    """Gaussian blur with standard deviation ``sigma`` pixels, a smooth loss of high frequencies."""
    _check_image(x)
    _check_non_negative("sigma", sigma)
    return Degraded(_convolve(x, _gaussian_kernel(sigma)), _label("blur"))


def _disk_kernel(radius: float) -> torch.Tensor:
    """Disk of the given radius with a one-pixel linear edge, so the kernel varies smoothly with radius."""
    extent = math.ceil(radius)
    offsets = torch.arange(-extent, extent + 1, dtype=torch.float64)
    distance = torch.hypot(offsets[:, None], offsets[None, :])
    kernel = (radius + 0.5 - distance).clamp(0.0, 1.0)
    return kernel / kernel.sum()


def defocus_blur(x: torch.Tensor, radius: float) -> Degraded:
    """Out-of-focus blur: convolution with a disk of ``radius`` pixels (std about radius / 2)."""
    _check_image(x)
    _check_non_negative("radius", radius)
    return Degraded(_convolve(x, _disk_kernel(radius)), _label("blur"))


def _motion_shifts(
    batch: int, height: int, severity: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per phase-encode line (row) displacement in pixels: (B, H) along rows and along columns.

    Each sample gets 1-3 motion segments, each a run of 10-25 % of the lines acquired while the
    patient was displaced by up to ``severity`` pixels along each axis; other lines are still.
    """
    shifts = torch.zeros(2, batch, height, dtype=torch.float64)
    for sample in range(batch):
        for _ in range(_randint(generator, 1, 3)):
            length = max(1, round(height * _uniform(generator, 0.10, 0.25)))
            start = _randint(generator, 0, height - length)
            displacement = (2 * torch.rand(2, 1, generator=generator, dtype=torch.float64) - 1) * severity
            shifts[:, sample, start : start + length] = displacement
    return shifts[0], shifts[1]


def motion(x: torch.Tensor, severity: float, generator: torch.Generator | None = None) -> Degraded:
    """Rigid in-plane translation during the scan, as k-space phase errors (ghosting).

    A translation by (dy, dx) multiplies k-space by the linear phase ramp
    exp(-2 pi i (ky dy / H + kx dx / W)); applying it only to the phase-encode lines acquired
    while the patient was displaced gives the inconsistent k-space of a moving patient.
    ``severity`` is the largest displacement in pixels; the magnitude image is returned.
    """
    _check_image(x)
    _check_non_negative("severity", severity)
    batch, _, height, width = x.shape
    shift_rows, shift_cols = _motion_shifts(batch, height, severity, generator)
    ky = (torch.arange(height, dtype=torch.float64) - height // 2) / height
    kx = (torch.arange(width, dtype=torch.float64) - width // 2) / width
    phase = -2 * math.pi * (shift_rows[:, :, None] * ky[:, None] + shift_cols[:, :, None] * kx[None, :])
    kspace = fft2c(x)
    ramp = torch.polar(torch.ones_like(phase), phase)[:, None].to(device=x.device, dtype=kspace.dtype)
    return Degraded(ifft2c(kspace * ramp).abs(), _label("motion"))


def low_resolution(x: torch.Tensor, factor: float) -> Degraded:
    """Thick-slice / low-matrix acquisition: area down-sampling by ``factor``, bicubic back to (H, W)."""
    _check_image(x)
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"factor must be a finite number >= 1, got {factor!r}; 1 leaves the image unchanged")
    height, width = x.shape[-2:]
    small_size = (max(1, round(height / factor)), max(1, round(width / factor)))
    small = F.interpolate(x, size=small_size, mode="area")
    restored = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)
    return Degraded(restored, _label("low_resolution"))


def _protocol_degradation(x: torch.Tensor, modality: str, generator: torch.Generator) -> Degraded:
    """The paper's training protocol: Eq. (5) with a random Cartesian (MRI) or radial (CT) mask."""
    if modality == "CT":
        return sparse_view_ct(x, _randint(generator, 30, 120), generator)
    acceleration = _uniform(generator, 2.0, 8.0)
    center_fraction = _uniform(generator, 0.04, 0.12)
    pattern = ("random", "equispaced")[_randint(generator, 0, 1)]
    return undersample_mri(x, acceleration, center_fraction, pattern, generator)


def _primitive_degradation(x: torch.Tensor, modality: str, generator: torch.Generator, kind: str) -> Degraded:
    """The visual primitive ``kind`` at a random clinically plausible severity."""
    if kind == "noise":
        noise = rician_noise if modality == "MRI" else gaussian_noise
        return noise(x, _uniform(generator, 0.02, 0.1), generator)
    if kind == "blur":
        if _randint(generator, 0, 1):
            return defocus_blur(x, _uniform(generator, 1.6, 4.0))
        return gaussian_blur(x, _uniform(generator, 0.8, 2.0))
    if kind == "motion":
        return motion(x, _uniform(generator, 2.0, 8.0), generator)
    return low_resolution(x, _uniform(generator, 2.0, 4.0))


def random_degradation(
    x: torch.Tensor,
    modality: Literal["MRI", "CT"],
    generator: torch.Generator,
    primitives: bool = True,
    balanced: bool = False,
) -> Degraded:
    """Draw one training degradation for the whole batch (one label per call).

    With ``primitives=False`` this is the paper's protocol: MRI gets Cartesian undersampling with
    acceleration in [2, 8], centre fraction in [0.04, 0.12] and a random or equispaced pattern;
    CT gets radial sparse-view sampling with 30-120 spokes. With ``primitives=True`` that
    protocol is used with probability 0.5, otherwise one primitive chosen uniformly, with
    severities for images in [0, 1]:
    noise sigma 0.02-0.1 (Rician for MRI, Gaussian for CT); blur Gaussian sigma 0.8-2.0 px or
    defocus radius 1.6-4.0 px (the same spread); motion up to 2-8 px displacement; low
    resolution factor 2-4. With ``balanced`` (and ``primitives``), each of the modality's five degradations,
    the protocol and the four primitives, is drawn with probability 1/5: the prior's classification loss then
    sees balanced classes instead of a protocol four times as frequent as each primitive, which pulled its
    errors towards the protocol (noise and motion taken for sparse-view, MODEL_CARD.md).
    """
    _check_image(x)
    if modality not in ("MRI", "CT"):
        raise ValueError(f"modality must be 'MRI' or 'CT', got {modality!r}")
    if primitives and balanced:
        choice = _randint(generator, 0, len(PRIMITIVES))
        if choice < len(PRIMITIVES):
            return _primitive_degradation(x, modality, generator, PRIMITIVES[choice])
    elif primitives and _randint(generator, 0, 1):
        return _primitive_degradation(x, modality, generator, PRIMITIVES[_randint(generator, 0, len(PRIMITIVES) - 1)])
    return _protocol_degradation(x, modality, generator)
