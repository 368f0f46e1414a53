"""The plain peer of VL-DUN: a joint U-Net with a residual restoration head and a segmentation head.

Same inputs, outputs, losses, data, degradations and training budget as VL-DUN (it is built and trained
by the same code through `config.architecture = "unet"`), but no prior, no unfolding and no Mamba, so a
report can say what the method adds over a conventional network of similar size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from VLDUNLib.config import VLDUNConfig
from VLDUNLib.network import ARCHITECTURES, VLDUNOutput, pad_to_multiple


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm and SiLU."""
    groups = min(8, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
    )


class JointUNet(nn.Module):
    """U-Net whose width and depth follow the config (`channels` at full resolution, `levels` + 1 scales)."""

    def __init__(self, config: VLDUNConfig) -> None:
        super().__init__()
        self.config = config
        self.prior = None
        widths = [config.channels * 2**level for level in range(config.levels + 1)]
        self.inc = conv_block(config.in_channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), conv_block(widths[i], widths[i + 1])) for i in range(config.levels)
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(config.levels))
        self.dec = nn.ModuleList(conv_block(2 * widths[i], widths[i]) for i in range(config.levels))
        self.rec_head = nn.Conv2d(widths[0], config.in_channels, 1) if config.rec_head else None
        self.seg_head = nn.Conv2d(widths[0], config.num_classes, 1) if config.seg_head else None

    def compute_prior(self, degraded: torch.Tensor) -> None:
        return None

    def forward(
        self, degraded: torch.Tensor, prior: object = None, *, restore: bool = True, segment: bool = True
    ) -> VLDUNOutput:
        y, (h, w) = pad_to_multiple(degraded, 2**self.config.levels)
        skips = [self.inc(y)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for level in reversed(range(self.config.levels)):
            x = self.dec[level](torch.cat([self.up[level](x), skips[level]], 1))
        restored = (y + self.rec_head(x))[..., :h, :w] if self.rec_head is not None and restore else None
        seg = self.seg_head(x)[..., :h, :w] if self.seg_head is not None and segment else None
        return VLDUNOutput(restored, seg, None)

    def unfolding_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def restoration_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("seg_head."))

    def segmentation_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("rec_head."))


ARCHITECTURES["unet"] = JointUNet
