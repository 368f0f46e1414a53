"""The vision-language dual prior of VL-DUN (Sec. 3.3), built from open_clip model classes.

- Modality prior: the CLIP visual encoder E_v and a linear classifier W_cls (Eq. 2), trained with the
  focal loss of Eq. 3.
- Degradation prior: cosine similarities of E_v(y) to K fixed text prompts encoded by the *frozen* CLIP
  text encoder E_t, trained with an image-text cross-entropy over those similarities.

Because E_t is frozen and the prompts are fixed, E_t's only output that ever matters is the K prompt
embeddings. They are computed once, when the prior is built, and kept as a buffer; the text tower is
then dropped. This makes the shipped weights a fraction of the size and inference never runs E_t,
and it is exactly equivalent to keeping a frozen E_t.

No weights are downloaded: a pretrained open_clip checkpoint is loaded from a local `.safetensors`
file when the user has one (`clip_weights=`); otherwise the towers start from open_clip's
initialisation and our own training pipeline tunes the visual encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import load_file
from torch import nn

from .config import DEGRADATION_PROMPTS, PriorConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PriorOutput:
    """What the dual prior tells the network and the user about a batch of images."""

    modality_logits: torch.Tensor  # (B, M)
    degradation_logits: torch.Tensor  # (B, K)
    tokens: torch.Tensor  # (B, 2 + K, E): the keys/values of the AMGDM cross-attention (Eq. 10)

    @property
    def modality_probs(self) -> torch.Tensor:
        """Eq. 2: p = softmax(W_cls f_mod), with f_mod = E_v(y)."""
        return self.modality_logits.softmax(-1)

    @property
    def degradation_probs(self) -> torch.Tensor:
        return self.degradation_logits.softmax(-1)

    @property
    def embedding(self) -> torch.Tensor:
        """(B, E) unit visual embedding E_v(y) (the first prior token); pooled, the mean over the slices.

        What the unknown-scan score measures (`ood.NearestNeighbourOOD`): unlike the class probabilities it is not
        forced onto one of the training modalities.
        """
        return self.tokens[:, 0]

    def pooled(self) -> PriorOutput:
        """One prior for a whole volume: modality and degradation are properties of the scan, not a slice."""
        return PriorOutput(
            self.modality_logits.mean(0, keepdim=True),
            self.degradation_logits.mean(0, keepdim=True),
            self.tokens.mean(0, keepdim=True),
        )

    def expand(self, batch: int) -> PriorOutput:
        """Broadcast a pooled (batch 1) prior over `batch` slices without copying."""
        return PriorOutput(
            self.modality_logits.expand(batch, -1),
            self.degradation_logits.expand(batch, -1),
            self.tokens.expand(batch, -1, -1),
        )

    def detach(self) -> PriorOutput:
        return PriorOutput(self.modality_logits.detach(), self.degradation_logits.detach(), self.tokens.detach())


def check_open_clip_name(name: str) -> None:
    """Only open_clip's built-in architectures: never a `hf-hub:` download or a `local-dir:` pickle."""
    if ":" in name or "/" in name or name not in open_clip.list_models():
        raise ValueError(f"open_clip_model {name!r} is not one of open_clip's built-in architectures "
                         "(open_clip.list_models()); remote and local-directory models are refused.")


def build_clip(cfg: PriorConfig) -> CLIP:
    """An open_clip CLIP: a stock architecture by name (paper preset) or the compact CPU one."""
    if cfg.open_clip_model:
        check_open_clip_name(cfg.open_clip_model)
        return open_clip.create_model(cfg.open_clip_model, pretrained=None)
    vision = CLIPVisionCfg(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        layers=cfg.vision_layers,
        head_width=cfg.vision_head_width,
    )
    text = CLIPTextCfg(width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers)
    return CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def load_clip_checkpoint(clip: CLIP, path: str | Path) -> None:
    """Load pretrained open_clip weights from a local safetensors file (never a pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path.name}: only .safetensors CLIP checkpoints are loaded (pickled .bin/.pt files can run code). "
            "Use the model's open_clip_model.safetensors file instead."
        )
    if not path.is_file():
        raise ValueError(f"CLIP checkpoint {path} does not exist; check the path.")
    state = load_file(str(path))
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path.name} does not fit this CLIP architecture ({len(missing)} missing, {len(unexpected)} unexpected "
            f"keys, e.g. {(missing + unexpected)[:3]}); choose the checkpoint of the configured model."
        )


@torch.no_grad()
def encode_prompts(clip: CLIP, prompts: list[str], model_name: str | None) -> torch.Tensor:
    """Unit-norm embeddings of the fixed degradation prompts by the frozen text encoder E_t (Sec. 3.3.3)."""
    if model_name:
        check_open_clip_name(model_name)
    tokenizer = open_clip.get_tokenizer(model_name or "ViT-B-16")
    clip.eval()
    return F.normalize(clip.encode_text(tokenizer(prompts)), dim=-1)


def to_clip_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey slices in [0, 1] (B, 1, H, W) -> CLIP's RGB input at its resolution and normalisation."""
    x = F.interpolate(images.clamp(0, 1), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 3: L_mod = -alpha (1 - p_t)^gamma log(p_t), averaged over the batch.

    It down-weights the easy, abundant classes, which matters because the modality classes differ in
    size by two orders of magnitude (160 ACDC volumes against one abdominal CT).
    """
    log_pt = F.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    return (-alpha * (1 - log_pt.exp()).pow(gamma) * log_pt).mean()


def degradation_similarities(features: torch.Tensor, anchors: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """s_{i,k}: scaled dot products of unit image features with the K unit prompt anchors (Sec. 3.3.3)."""
    return logit_scale.exp() * F.normalize(features, dim=-1) @ anchors.t()


def image_text_loss(similarities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The image-text contrastive loss of Sec. 3.3.3: cross-entropy over the K prompt similarities."""
    return F.cross_entropy(similarities, target)


class DualPrior(nn.Module):
    """E_v + W_cls (modality) and E_v against frozen prompt anchors (degradation); emits the prior tokens."""

    def __init__(
        self,
        cfg: PriorConfig,
        modalities: tuple[str, ...],
        degradations: tuple[str, ...],
        clip_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        clip = build_clip(cfg)
        if clip_weights is not None:
            load_clip_checkpoint(clip, clip_weights)
        self.image_size = cfg.image_size
        self.visual = clip.visual
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())
        prompts = [DEGRADATION_PROMPTS[d] for d in degradations]
        self.register_buffer("anchors", encode_prompts(clip, prompts, cfg.open_clip_model))
        self.classifier = nn.Linear(cfg.embed_dim, len(modalities))
        self.token_dim = cfg.embed_dim

    def set_tuning(self, tune_visual: bool) -> None:
        """Freeze E_v for the "w/o CLIP tuning" ablation; the linear heads always train."""
        self.visual.requires_grad_(tune_visual)

    def forward(self, images: torch.Tensor) -> PriorOutput:
        """Images (B, 1, H, W) in [0, 1] -> modality/degradation logits and the prior tokens."""
        features = self.visual(to_clip_input(images, self.image_size))
        modality_logits = self.classifier(features)
        degradation_logits = degradation_similarities(features, self.anchors, self.logit_scale)
        return PriorOutput(modality_logits, degradation_logits, self.prior_tokens(features, modality_logits, degradation_logits))

    def prior_tokens(self, features: torch.Tensor, modality_logits: torch.Tensor, degradation_logits: torch.Tensor) -> torch.Tensor:
        """Tokens the image features query: [E_v(y); modality embedding; prompt anchors weighted by their probability].

        The modality embedding is p @ W_cls (the classifier's rows are learned per-modality directions),
        and each prompt anchor is scaled by its degradation probability, so the cross-attention sees both
        what was detected and how confidently (App. D.2: soft mapping, no hard decision).
        """
        modality = modality_logits.softmax(-1) @ self.classifier.weight
        anchors = degradation_logits.softmax(-1)[:, :, None] * self.anchors[None]
        return torch.cat([F.normalize(features, dim=-1)[:, None], F.normalize(modality, dim=-1)[:, None], anchors], 1)

    def with_degradation(self, prior: PriorOutput, index: int) -> PriorOutput:
        """The same prior with the degradation set by the user (a known acquisition) instead of detected."""
        logits = torch.full_like(prior.degradation_logits, -30.0)
        logits[:, index] = 30.0
        tokens = torch.cat([prior.tokens[:, :2], logits.softmax(-1)[:, :, None] * self.anchors[None]], 1)
        return PriorOutput(prior.modality_logits, logits, tokens)
