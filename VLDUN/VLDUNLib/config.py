"""The one configuration of a VL-DUN model, its presets and its ablation switches.

A config is plain data: it is written next to the weights as JSON, so a weights file can be checked
against it (unknown preset, wrong class count, mismatched shapes) before anything runs. It imports no torch,
so a model's JSON can be read (its tasks, for a selector) in a process that has not loaded torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DEGRADATIONS: tuple[str, ...] = (
    "noise",
    "blur",
    "motion",
    "low_resolution",
    "undersampling",
    "sparse_view",
)
"""The degradation kinds, in the order of the prior's labels (re-exported by `degradations`); defined here, without torch."""

DEGRADATION_PROMPTS: dict[str, str] = {
    "noise": "Noisy medical image with severe grain",
    "blur": "Blurry medical image with soft, defocused edges",
    "motion": "Medical image corrupted by patient motion with ghosting",
    "low_resolution": "Low-resolution medical image with pixelated, coarse details",
    "undersampling": "Undersampled MRI with aliasing and wrap-around ghosts",
    "sparse_view": "Sparse-view CT with radial streak artifacts",
    "none": "Clean medical image without artifacts",
}
"""One fixed text prompt per degradation (Sec. 3.3.3): the frozen text encoder turns them into anchors.

"none" is the answer for a clean scan: a model lists it in its `degradations` when it was trained with clean
slices as a class of their own (the shipped model was not, so it always names some degradation)."""

NO_DEGRADATION = "none"
NO_DEGRADATION_TEXT = "no degradation detected"
"""What the detection says when the "none" class wins."""

# Modality classes of the shipped model's training data; a trained model stores its own in its config.
DEFAULT_MODALITIES: tuple[str, ...] = (
    "ACDC/MRI",
    "BraTS2015/T1c",
    "BraTS2015/FLAIR",
    "COVID19CT/CT",
    "AbdomenCT/CT",
)


@dataclass
class PriorConfig:
    """The CLIP model behind the vision-language dual prior (open_clip `CLIP` classes)."""

    image_size: int = 128
    patch_size: int = 16
    vision_width: int = 192
    vision_layers: int = 4
    vision_head_width: int = 64
    text_width: int = 128
    text_heads: int = 2
    text_layers: int = 2
    embed_dim: int = 128
    open_clip_model: str | None = None
    """Name of a stock open_clip architecture (e.g. "ViT-B-16"); overrides the sizes above. Only open_clip's
    built-in local model configs: its `hf-hub:`/`local-dir:` schemes (a download, or a pickled model that
    torch.load would run) and paths are refused here, names open_clip does not list in `priors.build_clip`."""

    def __post_init__(self) -> None:
        name = self.open_clip_model
        if name is not None and (not isinstance(name, str) or ":" in name or "/" in name or "\\" in name):
            raise ValueError(f"open_clip_model {name!r} is not allowed: name one of open_clip's built-in "
                             "architectures (e.g. 'ViT-B-16'); remote (hf-hub:) and local-directory models are "
                             "refused because they download or unpickle code.")


@dataclass
class VLDUNConfig:
    """Architecture of the unfolding network and its prior.

    The U-shaped hierarchy has `levels` resolutions; with one unfolding stage per encoder level, one at the
    bottleneck and one per decoder level there are K = 2 * levels - 1 stages. `blocks[l]` repeats the
    stage's proximal module at level l (deeper levels are cheap, so the paper-size model spends its
    parameters there).
    """

    preset: str = "compact"
    architecture: str = "vldun"
    """"vldun", or "unet" for the plain joint U-Net baseline built from the same config."""
    in_channels: int = 1
    channels: int = 24
    levels: int = 3
    blocks: tuple[int, ...] = (1, 1, 1)
    stem_stride: int = 2
    d_state: int = 8
    expand: float = 1.5
    gdfn_expansion: float = 2.0
    attn_heads: int = 2
    num_classes: int = 12
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    degradations: tuple[str, ...] = DEGRADATIONS
    prior: PriorConfig = field(default_factory=PriorConfig)
    use_prior: bool = True
    """Ablation "w/o CLIP": no prior, the operator estimate sees the image only."""
    tune_prior: bool = True
    """Ablation "w/o CLIP tuning": the CLIP visual encoder stays frozen (only linear heads train)."""
    freq_decouple: bool = True
    """Ablation "w/o FD": Bi-Mamba and GDFN both see the whole feature map (Eq. 4 skipped)."""
    seg_head: bool = True
    rec_head: bool = True
    rec_hidden: int = 8
    """Channels of the restoration head's full-resolution refinement, the only layers that see every pixel."""
    seg_hidden: int = 0
    """Channels of an optional full-resolution refinement of the segmentation logits (`SegmentationRefinement`);
    0: the paper's small head alone, which predicts each stem_stride² block of labels from one feature vector."""
    seg_branch: bool = False
    """The segmentation head reads its own copy of the last decoder stage instead of the one restoration reads, so
    segmentation can be trained further without moving the restored image (`network.VLDUN.adapt_state`)."""

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        self.modalities = tuple(self.modalities)
        self.degradations = tuple(self.degradations)
        if isinstance(self.prior, dict):
            self.prior = PriorConfig(**self.prior)
        if self.architecture not in ("vldun", "unet"):
            raise ValueError(f"Unknown architecture {self.architecture!r}; choose 'vldun' or 'unet'.")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels}: the U-shaped hierarchy needs at least 2 levels.")
        if self.seg_hidden < 0:
            raise ValueError(f"seg_hidden={self.seg_hidden}: give 0 (no refinement) or a number of channels.")
        if len(self.blocks) != self.levels:
            raise ValueError(f"blocks has {len(self.blocks)} entries but levels={self.levels}; give one per level.")
        if not (self.seg_head or self.rec_head):
            raise ValueError("A model needs at least one head: enable seg_head or rec_head.")
        unknown = set(self.degradations) - set(DEGRADATION_PROMPTS)
        if unknown:
            raise ValueError(f"No text prompt for degradation(s) {sorted(unknown)}; known: {list(DEGRADATION_PROMPTS)}.")

    @property
    def stages(self) -> int:
        """K, the number of unfolding stages."""
        return 2 * self.levels - 1

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this inside the model."""
        return self.stem_stride * 2 ** (self.levels - 1) * 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLDUNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown model config key(s) {sorted(unknown)}; is the config from a newer VLDUN?")
        return cls(**data)


PRESETS: dict[str, VLDUNConfig] = {
    "compact": VLDUNConfig(),
    # `paper` keeps the paper's size (K = 7 stages, 21 M parameters) but, like `compact`, enters the U at half
    # resolution through a lossless pixel-unshuffle stem: full-resolution Bi-Mamba scans took 10.1 s against
    # 2.7 s per 256x256 slice on one CPU thread with the same parameters (`stem_stride: 1` restores them).
    "paper": VLDUNConfig(
        preset="paper",
        channels=48,
        levels=4,
        blocks=(1, 1, 2, 4),
        stem_stride=2,
        d_state=16,
        expand=2.0,
        gdfn_expansion=2.66,
        attn_heads=4,
        prior=PriorConfig(image_size=224, open_clip_model="ViT-B-16", embed_dim=512),
    ),
}

ABLATIONS: dict[str, dict[str, bool]] = {
    "full": {},
    "no_clip": {"use_prior": False},
    "no_clip_tuning": {"tune_prior": False},
    "no_fd": {"freq_decouple": False},
    "no_seg_head": {"seg_head": False},
    "no_rec_head": {"rec_head": False},
}
"""The rows of the paper's Table 3, by name."""


def make_config(preset: str = "compact", ablation: str = "full", **overrides: Any) -> VLDUNConfig:
    """A fresh config from a preset, an ablation of Table 3 and explicit overrides."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}.")
    base = PRESETS[preset].to_dict()
    base.update(ABLATIONS[ablation])
    base.update(overrides)
    return VLDUNConfig.from_dict(base)
