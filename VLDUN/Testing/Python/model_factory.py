"""Small models for fast CPU tests: every part of the real architecture, at toy width."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from VLDUNLib.config import PriorConfig, VLDUNConfig, make_config

if TYPE_CHECKING:
    from VLDUNLib.inference import VolumePredictor

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
"""The developer datasets beside the checkout (../shared/data), as CI lays them out."""

TINY_PRIOR = PriorConfig(
    image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_head_width=16,
    text_width=32, text_heads=2, text_layers=1, embed_dim=16,
)


def tiny_config(**overrides: Any) -> VLDUNConfig:
    """The compact preset shrunk: 2 levels (3 stages), 8 channels, tiny CLIP."""
    base: dict[str, Any] = dict(channels=8, levels=2, blocks=(1, 1), d_state=4, expand=1.0, attn_heads=2,
                                num_classes=4, prior=TINY_PRIOR)
    base.update(overrides)
    ablation = base.pop("ablation", "full")
    return make_config("compact", ablation, **base)


def tiny_predictor(ood_threshold: float = 0.0, **overrides: Any):
    """A VolumePredictor around an untrained tiny model of ACDC alone (fast, deterministic): its one modality class
    and its classes, so task "auto" segments the heart unless the scan is flagged unknown."""
    import torch

    from VLDUNLib.inference import VolumePredictor
    from VLDUNLib.network import build_model
    from VLDUNLib.weights import ModelInfo

    torch.manual_seed(0)
    config = tiny_config(**{"modalities": ("ACDC/MRI",), **overrides})
    info = ModelInfo(config, ["background", "ACDC/RV", "ACDC/MYO", "ACDC/LV"], {"ACDC": [1, 2, 3]}, ood_threshold)
    return VolumePredictor(device="cpu", model=(build_model(config).eval(), info))


TWO_TASK_CLASSES = ["background", "ACDC/RV", "ACDC/MYO", "ACDC/LV", "BraTS2015/edema", "BraTS2015/enhancing"]


def two_task_predictor(ood_threshold: float = 0.0) -> VolumePredictor:
    """A tiny untrained model of ACDC and BraTS2015: tasks "heart" (3 classes) and "brain_tumour" (2 classes).
    `ood_threshold` above 1 flags every scan unknown (it has no unknown-scan statistics, so the modality
    probability, at most 1, is compared with it)."""
    import torch
    from VLDUNLib.inference import VolumePredictor
    from VLDUNLib.network import build_model
    from VLDUNLib.weights import ModelInfo

    torch.manual_seed(0)
    config = tiny_config(modalities=("ACDC/MRI", "BraTS2015/T1c"), num_classes=len(TWO_TASK_CLASSES))
    info = ModelInfo(config, list(TWO_TASK_CLASSES), {"ACDC": [1, 2, 3], "BraTS2015": [4, 5]}, ood_threshold)
    return VolumePredictor(device="cpu", model=(build_model(config).eval(), info))
