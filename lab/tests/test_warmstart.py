"""Warm starts for training: every tensor that fits is copied, and earlier head shapes are mapped onto new ones."""

from __future__ import annotations

import pytest
import torch
from model_factory import tiny_config
from vldun_lab.warmstart import load_matching_weights
from VLDUNLib.network import VLDUN, build_model
from VLDUNLib.weights import ModelInfo, WeightsError, save_weights


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = VLDUN(config).eval()
    info = ModelInfo(config, ["background", "A/x", "A/y", "B/z"], {"A": [1, 2], "B": [3]}, 0.4, train_size=96)
    path = tmp_path / "model.safetensors"
    save_weights(model, info, path)
    return model, path


def test_a_tampered_file_is_refused(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        load_matching_weights(VLDUN(tiny_config()), path)


def test_fine_tuning_start_keeps_every_tensor_that_fits(saved):
    model, path = saved
    torch.manual_seed(1)
    other = VLDUN(tiny_config(num_classes=7))
    fresh = load_matching_weights(other, path)
    head = [k for k in other.state_dict() if k.startswith("seg_head.") and other.state_dict()[k].shape != model.state_dict()[k].shape]
    assert fresh == sorted(head) and head
    source, target = model.state_dict(), other.state_dict()
    assert all(torch.equal(source[k], target[k]) for k in target if k not in fresh)
    assert not torch.equal(source[head[0]][:1], target[head[0]][:1])


def test_a_wider_restoration_head_starts_as_the_files_head(saved):
    """Widening the full-resolution head for fine-tuning must not throw away what the file had learned."""
    model, path = saved
    torch.manual_seed(1)
    wider = VLDUN(tiny_config(rec_hidden=16)).eval()
    fresh = load_matching_weights(wider, path)
    assert fresh == []
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(wider(x).restored, model(x).restored, atol=1e-6, rtol=0)
    wider(x).restored.square().mean().backward()
    assert wider.rec_head.refine[2].weight.grad[:, 8:].abs().max() > 0
    assert wider.rec_head.refine[0].weight[8:].abs().max() > 0


def test_a_segmentation_branch_starts_as_the_files_last_decoder_stage_and_trains_alone(saved):
    """Fine-tuning the branch moves the segmentation and leaves the restored image exactly as the file made it."""
    model, path = saved
    torch.manual_seed(1)
    branched = VLDUN(tiny_config(seg_branch=True)).eval()
    assert load_matching_weights(branched, path) == []
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        before = branched(x)
        reference = model(x)
    assert torch.equal(before.restored, reference.restored) and torch.equal(before.seg_logits, reference.seg_logits)
    trainable = [p for name, p in branched.named_parameters() if name.startswith(("seg_decoder.", "seg_head."))]
    for p in branched.parameters():
        p.requires_grad_(any(p is q for q in trainable))
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    torch.nn.functional.cross_entropy(branched(x).seg_logits, target).backward()
    optimizer.step()
    with torch.no_grad():
        after = branched(x)
    assert torch.equal(after.restored, before.restored)
    assert not torch.equal(after.seg_logits, before.seg_logits)


def test_fine_tuning_start_can_take_the_prior_alone(saved):
    model, path = saved
    torch.manual_seed(1)
    other = VLDUN(tiny_config())
    fresh = load_matching_weights(other, path, ["prior"])
    source, target = model.state_dict(), other.state_dict()
    assert fresh == sorted(k for k in target if not k.startswith("prior.")) and fresh
    assert all(torch.equal(source[k], target[k]) for k in target if k.startswith("prior."))
    assert not torch.equal(source["embed.weight"], target["embed.weight"])
    with pytest.raises(WeightsError, match=r"\['priors'\] are not parts of this model"):
        load_matching_weights(other, path, ["priors"])


def test_fine_tuning_from_another_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(WeightsError, match="shares no tensor"):
        load_matching_weights(build_model(tiny_config(architecture="unet")), path)
