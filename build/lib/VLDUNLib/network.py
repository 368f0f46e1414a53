"""The VL-DUN network: CLIP dual prior, K unfolding stages in a U-shaped hierarchy, two heads (Sec. 3.2).

    y ─ stem ─ embed ─► x_0 = y_0
    encoder  level l = 0..L-2 : x = Stage(x, y_l, prior); skip; x = Down(x); y_{l+1} = Down_y(y_l)
    bottleneck level L-1      : x = Stage(x, y_{L-1}, prior)
    decoder  level l = L-2..0 : x = Up(x); x = Merge(x, skip); x = Stage(x, y_l, prior)
    restored = RestorationHead(x, y)   segmentation logits = SegHead(x') [+ SegmentationRefinement(x', y)]
    (x' = x, or with `seg_branch` the output of the segmentation head's own copy of the last decoder stage)

Any height and width work: the input is padded (reflect) to a multiple of `config.size_multiple`
inside `forward` and both outputs are cropped back, so callers never pad.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VLDUNConfig
from .priors import DualPrior, PriorOutput
from .unfolding import UnfoldingStage


@dataclass
class VLDUNOutput:
    restored: torch.Tensor | None  # (B, 1, H, W), in the input's [0, 1] scale; None without a rec head
    seg_logits: torch.Tensor | None  # (B, num_classes, H, W); None without a seg head
    prior: PriorOutput | None  # None in the "w/o CLIP" ablation


class Downsample(nn.Module):
    """Halve the resolution, double the channels (conv then pixel-unshuffle, as in Restormer)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels (conv then pixel-shuffle)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class RestorationHead(nn.Module):
    """Features at stem resolution -> restored image at full resolution: y + a refined residual.

    A pixel-shuffle alone predicts each of the stride^2 sub-pixel positions with its own filters, which leaves
    a fixed grid in the residual; a 3x3 refinement at full resolution, which also sees the degraded input,
    couples the sub-pixels. Its last convolution keeps PyTorch's random start: a zero start returns the input
    exactly but passes the trunk no restoration gradient, so restoration would not learn from scratch.
    """

    def __init__(self, width: int, out_channels: int, stride: int, hidden: int = 8) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(width, hidden * stride**2, 3, padding=1), nn.PixelShuffle(stride))
        self.refine = nn.Sequential(
            nn.Conv2d(hidden + out_channels, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.refine(torch.cat([self.expand(x), y], 1))


class SegmentationRefinement(nn.Module):
    """A full-resolution correction of the segmentation logits that also sees the degraded input.

    The paper's head predicts each stride x stride block of labels from one half-resolution feature vector, which
    must encode where inside the block a boundary falls; a 3x3 stage at full resolution that reads the image can
    take it from the pixels (thin structures such as the myocardium are 2-4 pixels wide at 128 px). Its last
    convolution starts at zero, so a trained model gains it without changing its output; the trunk still gets
    the segmentation gradient through the paper's head.
    """

    def __init__(self, width: int, in_channels: int, classes: int, stride: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(width, hidden * stride**2, 3, padding=1), nn.PixelShuffle(stride))
        self.refine = nn.Sequential(
            nn.Conv2d(hidden + in_channels, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, classes, 3, padding=1)
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.refine(torch.cat([self.expand(x), y], 1))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W up to a multiple (replicate where the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


class VLDUN(nn.Module):
    """Joint restoration and segmentation by vision-language controlled deep unfolding."""

    def __init__(self, config: VLDUNConfig, clip_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.prior = (
            DualPrior(c.prior, c.modalities, c.degradations, clip_weights) if c.use_prior else None
        )
        if self.prior is not None:
            self.prior.set_tuning(c.tune_prior)
        token_dim = self.prior.token_dim if self.prior is not None else None
        widths = [c.channels * 2**level for level in range(c.levels)]
        stem_channels = c.in_channels * c.stem_stride**2
        self.stem = nn.PixelUnshuffle(c.stem_stride)
        self.embed = nn.Conv2d(stem_channels, widths[0], 3, padding=1)

        def stage(level: int) -> UnfoldingStage:
            return UnfoldingStage(
                widths[level], token_dim, c.attn_heads, c.d_state, c.expand, c.gdfn_expansion,
                c.freq_decouple, c.blocks[level],
            )

        self.encoder = nn.ModuleList(stage(level) for level in range(c.levels - 1))
        self.down = nn.ModuleList(Downsample(widths[level]) for level in range(c.levels - 1))
        self.down_y = nn.ModuleList(Downsample(widths[level]) for level in range(c.levels - 1))
        self.bottleneck = stage(c.levels - 1)
        self.up = nn.ModuleList(Upsample(widths[level + 1]) for level in range(c.levels - 1))
        self.merge = nn.ModuleList(nn.Conv2d(2 * widths[level], widths[level], 1) for level in range(c.levels - 1))
        self.decoder = nn.ModuleList(stage(level) for level in range(c.levels - 1))
        self.seg_decoder = stage(0) if c.seg_branch and c.seg_head else None
        unshuffle = c.stem_stride**2
        self.rec_head = RestorationHead(widths[0], c.in_channels, c.stem_stride, c.rec_hidden) if c.rec_head else None
        self.seg_head = (
            nn.Sequential(
                nn.Conv2d(widths[0], widths[0], 3, padding=1),
                nn.GELU(),
                nn.Conv2d(widths[0], c.num_classes * unshuffle, 1),
                nn.PixelShuffle(c.stem_stride),
            )
            if c.seg_head
            else None
        )
        self.seg_refine = (
            SegmentationRefinement(widths[0], c.in_channels, c.num_classes, c.stem_stride, c.seg_hidden)
            if c.seg_head and c.seg_hidden
            else None
        )

    def compute_prior(self, degraded: torch.Tensor) -> PriorOutput | None:
        """The dual prior of a batch of degraded slices in [0, 1]; None in the "w/o CLIP" ablation."""
        return self.prior(degraded) if self.prior is not None else None

    def forward(
        self, degraded: torch.Tensor, prior: PriorOutput | None = None, *, restore: bool = True, segment: bool = True
    ) -> VLDUNOutput:
        """Restore and segment degraded slices (B, C, H, W) in [0, 1].

        `prior` lets a caller compute the prior once per volume (`PriorOutput.pooled().expand(B)`); when it
        is None it is computed from this batch. `restore`/`segment` False skip a head whose output the caller
        would discard (inference segments at the training scale in a pass of its own).
        """
        if degraded.ndim != 4 or degraded.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected slices of shape (B, {self.config.in_channels}, H, W), got {tuple(degraded.shape)}."
            )
        if prior is None:
            prior = self.compute_prior(degraded)
        tokens = prior.tokens if prior is not None and self.prior is not None else None
        y, (h, w) = pad_to_multiple(degraded, self.config.size_multiple)
        x, y_0 = self.decode(self.encode(y, tokens), tokens)
        restore = restore and self.rec_head is not None
        segment = segment and self.seg_head is not None
        shared = self.decoder[0](x, y_0, tokens) if restore or (segment and self.seg_decoder is None) else None
        restored = seg = None
        if restore:
            restored = self.rec_head(shared, y)[..., :h, :w]
        if segment:
            features = shared if self.seg_decoder is None else self.seg_decoder(x, y_0, tokens)
            seg = self.seg_head(features)
            if self.seg_refine is not None:
                seg = seg + self.seg_refine(features, y)
            seg = seg[..., :h, :w]
        return VLDUNOutput(restored, seg, prior)

    def encode(
        self, y: torch.Tensor, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        y_level = self.embed(self.stem(y))
        x = y_level
        skips, ys = [], []
        for stage, down, down_y in zip(self.encoder, self.down, self.down_y):
            x = stage(x, y_level, tokens)
            skips.append(x)
            ys.append(y_level)
            x, y_level = down(x), down_y(y_level)
        return self.bottleneck(x, y_level, tokens), skips, ys

    def decode(
        self, encoded: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]], tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder up to the input of its last stage, which each head applies itself (`seg_branch`)."""
        x, skips, ys = encoded
        for level in reversed(range(self.config.levels - 1)):
            x = self.merge[level](torch.cat([self.up[level](x), skips[level]], 1))
            if level:
                x = self.decoder[level](x, ys[level], tokens)
        return x, ys[0]

    def unfolding_parameters(self) -> int:
        """Parameters of the unfolding network and heads (what the paper's 22.77 M counts; CLIP excluded)."""
        prior = {id(p) for p in self.prior.parameters()} if self.prior is not None else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in prior)

    def restoration_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters the restored image depends on: all but the prior and the segmentation-only layers."""
        return ((n, p) for n, p in self.named_parameters() if not n.startswith(("seg_", "prior.")))

    def segmentation_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters the segmentation depends on: all but the prior and the restoration-only layers (with
        `seg_branch`, the shared last decoder stage feeds restoration alone)."""
        own = ("rec_head.", "prior.") + (("decoder.0.",) if self.seg_decoder is not None else ())
        return ((n, p) for n, p in self.named_parameters() if not n.startswith(own))

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Another model's tensors made to start this one where that model ended (fine-tuning): a wider
        restoration head embeds the narrower one (`_widen_restoration_head`), a segmentation branch starts as
        the shared last decoder stage (`_branch_segmentation_stage`). Tensors that still do not fit are dropped."""
        own = self.state_dict()
        state = self._branch_segmentation_stage(self._widen_restoration_head(state, own), own)
        return {key: tensor for key, tensor in state.items() if key in own and tensor.shape == own[key].shape}

    @staticmethod
    def _branch_segmentation_stage(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file without `seg_branch` gives the segmentation branch its shared last decoder stage, so
        segmentation starts exactly as the file's and can then be trained without moving restoration."""
        branch = {key: "decoder.0." + key.removeprefix("seg_decoder.") for key in own if key.startswith("seg_decoder.")}
        if not branch or any(key in state for key in branch) or not all(source in state for source in branch.values()):
            return state
        return {**state, **{key: state[source].clone() for key, source in branch.items()}}

    @staticmethod
    def _widen_restoration_head(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's restoration head inside a wider one of `own`'s shapes, computing the same image (net2wider).

        Its channels come first and keep their weights; the new channels get `own`'s random input weights and
        zero output weights, so they are silent at the start yet receive gradients from the first step. A file
        whose head is as wide or wider is returned unchanged (a narrower head starts fresh).
        """
        out_key = "rec_head.refine.2.weight"
        if out_key not in state or out_key not in own:
            return state
        old, new = state[out_key].shape[1], own[out_key].shape[1]
        if new <= old:
            return state
        shuffle = own["rec_head.expand.0.weight"].shape[0] // new
        widened = {key: own[key].clone() for key in own if key.startswith("rec_head.")}
        for key in ("rec_head.expand.0.weight", "rec_head.expand.0.bias", "rec_head.refine.0.bias"):
            rows = old * shuffle if "expand" in key else old
            widened[key][:rows] = state[key]
        first, source = widened["rec_head.refine.0.weight"], state["rec_head.refine.0.weight"]
        first[:old] = 0
        first[:old, :old] = source[:, :old]  # old channels from old channels
        first[:old, new:] = source[:, old:]  # and from the degraded image, the last input
        widened[out_key].zero_()[:, :old] = state[out_key]
        widened["rec_head.refine.2.bias"] = state["rec_head.refine.2.bias"]
        return {**state, **widened}


ARCHITECTURES: dict[str, Callable[[VLDUNConfig], nn.Module]] = {"vldun": VLDUN}
"""Model classes by `config.architecture`; the lab registers its baselines here when it is imported."""


def build_model(config: VLDUNConfig, clip_weights: str | Path | None = None) -> nn.Module:
    """The network a config describes: VL-DUN, or a baseline that the lab registered in `ARCHITECTURES`."""
    if config.architecture == "vldun":
        return VLDUN(config, clip_weights)
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {config.architecture!r} is a lab baseline; install the VLDUN lab "
                         "(`pip install -e lab`) and import vldun_lab to build it.")
    return ARCHITECTURES[config.architecture](config)
