"""The joint U-Net peer: same interface as VL-DUN, built through the product's model builder once the lab is imported."""

from __future__ import annotations

import pytest
import torch

import vldun_lab.baseline  # noqa: F401 (registers the baseline)
from model_factory import tiny_config, tiny_predictor
from VLDUNLib.network import build_model


def test_unet_baseline_has_the_same_interface():
    model = build_model(tiny_config(architecture="unet", levels=2, blocks=(1, 1)))
    out = model(torch.rand(2, 1, 15, 18))
    assert out.restored.shape == (2, 1, 15, 18) and out.seg_logits.shape == (2, 4, 15, 18) and out.prior is None


def test_a_skipped_head_leaves_the_baseline_output_unchanged():
    model = tiny_predictor(architecture="unet").model
    x = torch.rand(2, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        restored_only, seg_only = model(x, full.prior, segment=False), model(x, full.prior, restore=False)
    assert restored_only.seg_logits is None and seg_only.restored is None
    assert torch.equal(restored_only.restored, full.restored) and torch.equal(seg_only.seg_logits, full.seg_logits)


def test_without_the_lab_the_builder_names_the_fix(monkeypatch):
    from VLDUNLib import network

    monkeypatch.delitem(network.ARCHITECTURES, "unet")
    with pytest.raises(ValueError, match="pip install -e lab"):
        build_model(tiny_config(architecture="unet"))
