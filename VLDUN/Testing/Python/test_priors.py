"""The CLIP dual prior: losses of the paper, local checkpoints, one prior per volume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model_factory import TINY_PRIOR
from VLDUNLib.config import DEFAULT_MODALITIES, DEGRADATION_PROMPTS, PriorConfig
from VLDUNLib.degradations import DEGRADATIONS
from VLDUNLib.priors import DualPrior, build_clip, focal_loss, image_text_loss, to_clip_input


def tiny_prior(**kwargs) -> DualPrior:
    torch.manual_seed(0)
    return DualPrior(TINY_PRIOR, DEFAULT_MODALITIES, DEGRADATIONS, **kwargs)


def test_focal_loss_reduces_to_cross_entropy_without_focusing():
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(focal_loss(logits, target, alpha=1.0, gamma=0.0), F.cross_entropy(logits, target))


def test_focal_loss_down_weights_easy_examples():
    target = torch.tensor([0])
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    ratio_focal = focal_loss(easy, target, 1.0, 2.0) / focal_loss(hard, target, 1.0, 2.0)
    ratio_ce = F.cross_entropy(easy, target) / F.cross_entropy(hard, target)
    assert ratio_focal < ratio_ce / 10


def test_prior_outputs_and_tokens():
    prior = tiny_prior().eval()
    out = prior(torch.rand(3, 1, 40, 24))
    assert out.modality_logits.shape == (3, len(DEFAULT_MODALITIES))
    assert out.degradation_logits.shape == (3, len(DEGRADATIONS))
    assert out.tokens.shape == (3, 2 + len(DEGRADATIONS), TINY_PRIOR.embed_dim)
    assert torch.allclose(out.modality_probs.sum(-1), torch.ones(3))


def test_anchors_are_the_frozen_text_encoder_embeddings_of_the_prompts():
    prior = tiny_prior()
    assert prior.anchors.shape == (len(DEGRADATIONS), TINY_PRIOR.embed_dim)
    assert torch.allclose(prior.anchors.norm(dim=-1), torch.ones(len(DEGRADATIONS)), atol=1e-5)
    assert not any(n.startswith("anchors") for n, _ in prior.named_parameters())
    assert set(DEGRADATIONS) <= set(DEGRADATION_PROMPTS)


def test_image_text_loss_trains_the_visual_encoder_towards_its_prompt():
    prior = tiny_prior().train()
    images = torch.rand(4, 1, 32, 32)
    target = torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-3)
    first = None
    for _ in range(40):
        loss = image_text_loss(prior(images).degradation_logits, target)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 2


def test_pooled_prior_is_one_per_volume():
    prior = tiny_prior().eval()
    with torch.no_grad():
        pooled = prior(torch.rand(5, 1, 32, 32)).pooled()
    assert pooled.tokens.shape[0] == 1
    expanded = pooled.expand(7)
    assert expanded.tokens.shape[0] == 7 and expanded.tokens.data_ptr() == pooled.tokens.data_ptr()


def test_degradation_override_sets_a_certain_degradation():
    prior = tiny_prior().eval()
    with torch.no_grad():
        out = prior.with_degradation(prior(torch.rand(2, 1, 32, 32)).pooled(), 3)
    assert int(out.degradation_probs.argmax()) == 3
    assert torch.allclose(out.tokens[0, 2 + 3], prior.anchors[3], atol=1e-5)


def test_clip_input_is_three_channel_at_clip_resolution():
    x = to_clip_input(torch.rand(2, 1, 50, 70), 32)
    assert x.shape == (2, 3, 32, 32)


def test_pretrained_clip_loads_from_a_local_safetensors_file(tmp_path):
    torch.manual_seed(123)
    source = build_clip(TINY_PRIOR)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = tiny_prior(clip_weights=path)
    assert torch.equal(loaded.visual.conv1.weight, source.visual.conv1.weight)
    fresh = tiny_prior()
    assert not torch.allclose(loaded.anchors, fresh.anchors)


def test_pickled_or_mismatched_clip_checkpoints_are_refused(tmp_path):
    pickled = tmp_path / "open_clip_pytorch_model.bin"
    pickled.write_bytes(b"not used")
    with pytest.raises(ValueError, match="safetensors"):
        tiny_prior(clip_weights=pickled)
    other = build_clip(PriorConfig(**{**TINY_PRIOR.__dict__, "vision_width": 48, "vision_head_width": 16}))
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises((ValueError, RuntimeError)):
        tiny_prior(clip_weights=path)


def test_paper_preset_uses_the_vit_b_16_vision_tower():
    clip = build_clip(PriorConfig(image_size=224, open_clip_model="ViT-B-16", embed_dim=512))
    assert clip.visual.conv1.kernel_size == (16, 16)
    assert sum(p.numel() for p in clip.visual.parameters()) == pytest.approx(86.2e6, rel=0.01)
