"""The VL-DUN network: shapes, gradients, ablation switches, and that it can learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_factory import tiny_config
from VLDUNLib.config import ABLATIONS, VLDUNConfig, make_config
from VLDUNLib.network import VLDUN, build_model, pad_to_multiple
from VLDUNLib.unfolding import frequency_split


def tiny_model(**overrides) -> VLDUN:
    torch.manual_seed(0)
    return VLDUN(tiny_config(**overrides))


def test_restoration_loss_reaches_the_trunk_from_the_first_step():
    """With a zero-initialised last layer the trunk got no restoration gradient and, from scratch, never restored."""
    model = tiny_model().train()
    x = torch.rand(2, 1, 16, 16)
    out = model(x)
    (out.restored - x).square().mean().backward()
    assert model.embed.weight.grad.abs().max() > 1e-6
    assert model.rec_head.expand[0].weight.grad.abs().max() > 1e-6
    assert not torch.equal(out.restored, x)


def test_restoration_head_width_is_configurable():
    """`rec_hidden` sizes the full-resolution refinement; configs written before it keep the 8 they were trained with."""
    model = tiny_model(rec_hidden=16).eval()
    stride = model.config.stem_stride
    assert model.rec_head.expand[0].out_channels == 16 * stride**2
    assert model.rec_head.refine[0].in_channels == 16 + 1 and model.rec_head.refine[2].in_channels == 16
    with torch.no_grad():
        assert model(torch.rand(1, 1, 20, 20)).restored.shape == (1, 1, 20, 20)
    legacy = tiny_config().to_dict()
    del legacy["rec_hidden"]
    assert VLDUNConfig.from_dict(legacy).rec_hidden == 8


def test_segmentation_refinement_starts_as_the_paper_head_and_trains():
    """`seg_hidden` adds a full-resolution correction that a trained model gains without changing its output."""
    plain = tiny_model().eval()
    refined = tiny_model(seg_hidden=4).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("seg_refine.") for key in missing)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(refined(x).seg_logits, plain(x).seg_logits)
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, :, 5:] = 1
    F.cross_entropy(refined.train()(x).seg_logits, target).backward()
    assert refined.seg_refine.refine[-1].weight.grad.abs().max() > 0
    assert plain.seg_refine is None
    legacy = tiny_config().to_dict()
    del legacy["seg_hidden"], legacy["seg_branch"]
    assert VLDUNConfig.from_dict(legacy).seg_hidden == 0 and not VLDUNConfig.from_dict(legacy).seg_branch
    with pytest.raises(ValueError, match="seg_hidden=-1"):
        tiny_config(seg_hidden=-1)
    with pytest.raises(ValueError, match="at least 2 levels"):
        tiny_config(levels=1, blocks=(1,))


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (9, 40), (1, 1)])
def test_output_shapes_for_any_size(size):
    model = tiny_model().eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        out = model(x)
    assert out.restored.shape == x.shape
    assert out.seg_logits.shape == (2, model.config.num_classes, *size)
    assert out.prior.tokens.shape == (2, 2 + len(model.config.degradations), model.prior.token_dim)


def test_compact_preset_handles_odd_sizes_with_its_stem():
    torch.manual_seed(0)
    model = VLDUN(make_config("compact", channels=8, prior=tiny_config().prior)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 29, 35))
    assert out.restored.shape == (1, 1, 29, 35) and out.seg_logits.shape[-2:] == (29, 35)


def test_padding_is_cropped_back_exactly():
    x = torch.rand(1, 1, 13, 6)
    padded, (h, w) = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (16, 8) and (h, w) == (13, 6)
    assert torch.equal(padded[..., :h, :w], x)


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    out = model(torch.rand(2, 1, 16, 16))
    (out.restored.square().mean() + out.seg_logits.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("ablation,removed", [("no_clip", "prior"), ("no_seg_head", "seg_head"), ("no_rec_head", "rec_head")])
def test_ablation_removes_its_part(ablation, removed):
    full, ablated = tiny_model(), tiny_model(ablation=ablation)
    assert getattr(full, removed) is not None and getattr(ablated, removed) is None
    assert parameter_count(ablated) < parameter_count(full)
    out = ablated(torch.rand(1, 1, 16, 16))
    if ablation == "no_seg_head":
        assert out.seg_logits is None and out.restored is not None
    if ablation == "no_rec_head":
        assert out.restored is None and out.seg_logits is not None
    if ablation == "no_clip":
        assert out.prior is None
        assert all(stage.gradient.attention is None for stage in ablated.encoder)


def test_no_clip_output_differs_from_full_model_with_shared_weights():
    full, ablated = tiny_model().eval(), tiny_model(ablation="no_clip").eval()
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("prior.") and "attention" not in k})
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(full(x).restored, ablated(x).restored, atol=1e-6)


def test_no_fd_changes_the_output_with_the_same_weights():
    full, ablated = tiny_model().eval(), tiny_model(ablation="no_fd").eval()
    ablated.load_state_dict(full.state_dict())
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(full(x).restored, ablated(x).restored, atol=1e-6)


def test_no_clip_tuning_freezes_the_visual_encoder_only():
    model = tiny_model(ablation="no_clip_tuning")
    assert not any(p.requires_grad for p in model.prior.visual.parameters())
    assert all(p.requires_grad for p in model.prior.classifier.parameters())


def test_every_table3_ablation_builds():
    for name in ABLATIONS:
        build_model(tiny_config(ablation=name))


def test_frequency_split_is_exact():
    z = torch.randn(2, 3, 10, 14)
    low, high = frequency_split(z)
    assert low.shape[-2:] == (5, 7)
    recombined = high + F.interpolate(low, size=(10, 14), mode="bilinear", align_corners=False)
    assert torch.allclose(recombined, z, atol=1e-6)
    assert high.mean().abs() < z.mean().abs() + 1e-3


def test_volume_prior_is_reused_for_every_slice():
    model = tiny_model().eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        prior = model.compute_prior(x[:2]).pooled()
        out = model(x, prior.expand(4))
    assert out.prior.tokens.shape[0] == 4
    assert torch.equal(out.prior.tokens[0], out.prior.tokens[3])


def test_network_overfits_one_small_batch():
    """Loss falls 10x within a few hundred CPU steps: the whole model can learn."""
    model = tiny_model().train()
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 16, generator=generator)
    degraded = clean + 0.2 * torch.randn(2, 1, 16, 16, generator=generator)
    labels = (clean[:, 0] > 0.5).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_value() -> torch.Tensor:
        out = model(degraded)
        return F.l1_loss(out.restored, clean) + F.cross_entropy(out.seg_logits, labels)

    first = float(loss_value().detach())
    for _ in range(300):
        optimizer.zero_grad()
        loss = loss_value()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10
