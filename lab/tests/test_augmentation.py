"""Training augmentation: exact geometry, labels kept true and aligned, seeded draws, clear config errors."""

from __future__ import annotations

import pytest
import torch
from vldun_lab.augmentation import (
    Augmentation,
    flip_and_turn,
    gamma_and_window,
    zoom_and_rotate,
)

STRONG = Augmentation(zoom=(0.8, 1.25), rotation_degrees=15, gamma=(0.7, 1.5), window=(0.8, 1.25), probability=1.0)


@pytest.fixture
def slice_and_label() -> tuple[torch.Tensor, torch.Tensor]:
    """A bright disc (label 2) with a darker ring (label 1) off centre on black (label 0)."""
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    radius = ((rows - 28) ** 2 + (cols - 36) ** 2).sqrt()
    label = torch.where(radius < 8, 2, torch.where(radius < 14, 1, 0))
    image = torch.tensor([0.0, 0.4, 0.9])[label][None]
    return image, label


def test_identity_and_quarter_turn_are_exact(slice_and_label: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, label = slice_and_label
    same_image, same_label = zoom_and_rotate(image, label, 1.0, 0.0)
    torch.testing.assert_close(same_image, image, atol=1e-5, rtol=0)
    assert torch.equal(same_label, label)
    turned_image, turned_label = zoom_and_rotate(image, label, 1.0, 90.0)
    torch.testing.assert_close(turned_image, image.rot90(1, (-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(turned_label, label.rot90(1, (-2, -1)))


def test_zoom_two_enlarges_the_centre(slice_and_label: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, label = slice_and_label
    _, zoomed = zoom_and_rotate(image, label, 2.0, 0.0)
    assert torch.equal(zoomed[::2, ::2], label[16:48, 16:48])
    _, shrunk = zoom_and_rotate(image, label, 0.5, 0.0)
    assert (shrunk[:16] == 0).all() and (shrunk[:, :16] == 0).all(), "outside the slice is background"


def test_labels_stay_aligned_with_the_image_and_no_class_is_invented(
    slice_and_label: tuple[torch.Tensor, torch.Tensor],
) -> None:
    image, label = slice_and_label
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        new_image, new_label = Augmentation(zoom=(0.8, 1.25), rotation_degrees=15, probability=1.0)(
            image, label, generator
        )
        assert new_label.dtype == label.dtype and set(new_label.unique().tolist()) <= {0, 1, 2}
        disc = new_label == 2
        assert disc.any() and new_image[0][disc].mean() > 0.85, "the bright disc is where its label is"
        assert new_image[0][new_label == 0].mean() < 0.05


def test_gamma_and_window_keep_background_black_and_order_of_grey_values() -> None:
    ramp = torch.linspace(0, 1, 11)[None, None]
    for gamma, window in ((0.7, 0.8), (1.5, 1.25), (1.0, 1.0)):
        out = gamma_and_window(ramp, gamma, window)
        assert out[..., 0] == 0 and (out.diff() >= 0).all() and out.max() <= 1
    torch.testing.assert_close(gamma_and_window(ramp, 1.0, 1.0), ramp)
    assert (gamma_and_window(ramp, 1.0, 0.8)[..., -3:] == 1).all(), "a narrower window saturates bright tissue"


def test_draws_are_seeded_and_defaults_do_only_flips_and_turns(slice_and_label: tuple[torch.Tensor, torch.Tensor]) -> None:
    image, label = slice_and_label
    first = STRONG(image, label, torch.Generator().manual_seed(3))
    again = STRONG(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = STRONG(image, label, torch.Generator().manual_seed(4))
    assert not torch.equal(first[0], other[0])
    plain = Augmentation()(image, label, torch.Generator().manual_seed(3))
    reference = flip_and_turn(image, label, torch.Generator().manual_seed(3))
    assert torch.equal(plain[0], reference[0]) and torch.equal(plain[1], reference[1])
    assert not Augmentation().spatial and not Augmentation().intensity
    assert image.max() == 0.9, "input untouched"


def test_probability_zero_keeps_pixels_and_one_always_changes_them(
    slice_and_label: tuple[torch.Tensor, torch.Tensor],
) -> None:
    image, label = slice_and_label
    never = Augmentation(zoom=(0.8, 1.25), gamma=(0.7, 1.5), probability=0.0)
    for seed in range(5):
        out, _ = never(image, label, torch.Generator().manual_seed(seed))
        assert sorted(out.unique().tolist()) == sorted(image.unique().tolist())
    changed = [STRONG(image, label, torch.Generator().manual_seed(s))[0] for s in range(5)]
    assert all(len(out.unique()) > 3 for out in changed), "resampled or re-contrasted grey values"


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        ({"zoom": [1.2, 0.8]}, "zoom"),
        ({"gamma": [0, 1]}, "gamma"),
        ({"window": [1.0]}, "window"),
        ({"rotation_degrees": -5}, "rotation_degrees"),
        ({"probability": 2}, "probability"),
        ({"flip": True}, "known"),
    ],
)
def test_bad_settings_name_the_setting(settings: dict, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        Augmentation.from_config(settings)


def test_config_lists_become_tuples() -> None:
    assert Augmentation.from_config({"zoom": [0.9, 1.1]}) == Augmentation(zoom=(0.9, 1.1))
