"""One unfolding stage of VL-DUN: a proximal gradient step (AMGDM) then a proximal map (MDPMM).

Proximal gradient descent on 1/2 ||y - Phi x||^2 + lambda R(x) alternates
    z_k = x_{k-1} - eta_k Phi^T (Phi x_{k-1} - y)          (gradient step, AMGDM, Sec. 3.4.2)
    x_k = prox_R(z_k)                                       (proximal map, MDPMM, Sec. 3.4.3)
Both act on feature maps: x lives in the stage's feature space and y is the degraded image embedded at
the same level of the U-shaped hierarchy. Phi is estimated from the image features and the CLIP priors
(cross-attention, Eq. 10), Phi^T is played by a bidirectional Mamba layer, and the proximal map splits
the features into frequency bands (Eq. 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ssm import BiMamba2D


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network (Restormer): 1x1 expand, 3x3 depthwise, GELU gate, 1x1 project."""

    def __init__(self, channels: int, expansion: float) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, hidden * 2, 1)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2)
        self.project_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


def prior_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 10: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V.

    Q holds one query per pixel (B, heads, HW, d), K and V one entry per prior token (B, heads, T, d);
    with T of about ten tokens this costs O(HW T d), linear in the image size.
    """
    return F.scaled_dot_product_attention(q, k, v)


class PriorAttention(nn.Module):
    """Image features (queries) attend to the CLIP prior tokens (keys/values)."""

    def __init__(self, channels: int, token_dim: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} is not divisible by attn_heads={heads}.")
        self.heads = heads
        self.norm = LayerNorm2d(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(token_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(self.norm(x)).view(b, self.heads, d, h * w).transpose(2, 3)
        k, v = self.kv(tokens.to(x.dtype)).view(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        attended = prior_cross_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return self.out(attended)


def gradient_step(x: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The PGD gradient step of Sec. 3.4.1: z = x - eta * Phi^T (Phi x - y), with a learned eta > 0."""
    return x - F.softplus(step) * gradient


class AMGDM(nn.Module):
    """Attention-Mamba gradient descent module (Sec. 3.4.2, App. E.1).

    Phi x is estimated by a depthwise-separable convolution of x modulated by what the image features
    read from the priors (cross-attention); Phi^T maps the residual Phi x - y back with a Bi-Mamba layer,
    whose global receptive field accumulates the error of the whole slice.
    """

    def __init__(self, channels: int, token_dim: int | None, heads: int, d_state: int, expand: float) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.Conv2d(channels, channels, 1)
        )
        self.attention = PriorAttention(channels, token_dim, heads) if token_dim else None
        self.phi_transpose = BiMamba2D(channels, d_state=d_state, expand=expand)
        self.step = nn.Parameter(torch.tensor(math.log(math.expm1(0.5))))

    def estimate_operator(self, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        """Phi x, conditioned on the modality and degradation the prior detected."""
        phi_x = self.phi(x)
        if self.attention is not None and tokens is not None:
            phi_x = phi_x + self.attention(x, tokens)
        return phi_x

    def forward(self, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        residual = self.estimate_operator(x, tokens) - y
        return gradient_step(x, self.phi_transpose(residual), self.step)


def frequency_split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: x_low = AvgPool(z), x_high = z - x_low.

    x_low is kept at half resolution (the GDFN that processes it is 4x cheaper there); it is upsampled
    only to form x_high, so the two bands still add up to z exactly.
    """
    low = F.avg_pool2d(z, 2)
    return low, z - F.interpolate(low, size=z.shape[-2:], mode="bilinear", align_corners=False)


class MDPMM(nn.Module):
    """Mamba-GDFN proximal map module (Sec. 3.4.3, App. E.2): Bi-Mamba on x_high, GDFN on x_low, fused by a conv."""

    def __init__(self, channels: int, d_state: int, expand: float, gdfn_expansion: float, freq_decouple: bool) -> None:
        super().__init__()
        self.freq_decouple = freq_decouple
        self.norm = LayerNorm2d(channels)
        self.high = BiMamba2D(channels, d_state=d_state, expand=expand)
        self.low = GDFN(channels, gdfn_expansion)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zn = self.norm(z)
        if self.freq_decouple:
            low, high = frequency_split(zn)
            high = self.high(high)
            low = F.interpolate(self.low(low), size=z.shape[-2:], mode="bilinear", align_corners=False)
        else:
            high, low = self.high(zn), self.low(zn)
        return z + self.fuse(torch.cat([high, low], 1))


class UnfoldingStage(nn.Module):
    """Stage k: one AMGDM gradient step followed by `blocks` MDPMM proximal maps."""

    def __init__(
        self,
        channels: int,
        token_dim: int | None,
        heads: int,
        d_state: int,
        expand: float,
        gdfn_expansion: float,
        freq_decouple: bool,
        blocks: int,
    ) -> None:
        super().__init__()
        self.gradient = AMGDM(channels, token_dim, heads, d_state, expand)
        self.proximal = nn.Sequential(
            *(MDPMM(channels, d_state, expand, gdfn_expansion, freq_decouple) for _ in range(blocks))
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        return self.proximal(self.gradient(x, y, tokens))
