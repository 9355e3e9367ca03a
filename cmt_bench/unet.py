"""A small UNet in the EDM / DDPM++ style for image flow maps u_theta(x, s, t).

Residual blocks (GroupNorm, SiLU, 3x3 convolutions, the time conditioning added between them,
dropout), strided-convolution down and nearest-neighbour up sampling, skip connections, and
optional single-head self-attention at the lowest resolution. The attention is written with
plain matmuls because `scaled_dot_product_attention` has no forward-mode AD on CPU, and MeanFlow
differentiates the network with `torch.func.jvp`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .linear import Linear
from .schema import NetConfig
from .nets import TimeConditioning


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, cfg: NetConfig):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, cfg.norm_groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = Linear(emb, c_out)
        self.norm2, self.conv2 = _norm(c_out, cfg.norm_groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(cond)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2)  # DDPM++'s skip scale keeps activations O(1)


class Attention(nn.Module):
    """Single-head self-attention over pixels, as plain matmuls (forward-mode AD works)."""

    def __init__(self, channels: int, cfg: NetConfig):
        super().__init__()
        self.norm = _norm(channels, cfg.norm_groups)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [b, hw, hw]
        out = (v @ weights.transpose(1, 2)).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class UNet(nn.Module):
    """u_theta(x, s, t) for images of shape (C, H, W); H and W must halve cleanly at each level."""

    def __init__(self, shape: tuple[int, int, int], cfg: NetConfig, two_times: bool = True):
        super().__init__()
        c_img, height, width = shape
        levels = len(cfg.channel_mult)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"net.channel_mult has {levels} levels, so the image size must divide by "
                             f"{2 ** (levels - 1)}; got {height}x{width} (set data.pad_to or use fewer levels)")
        emb = 4 * cfg.channels
        self.time = TimeConditioning(cfg, emb, two_times)
        self.inp = nn.Conv2d(c_img, cfg.channels, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [cfg.channels], cfg.channels
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(ch, cfg.channels * mult, emb, cfg))
                ch = cfg.channels * mult
                skips.append(ch)
            if level < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb, cfg), Attention(ch, cfg) if cfg.attention else nn.Identity(),
                                  ResBlock(ch, ch, emb, cfg)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(ch + skips.pop(), cfg.channels * mult, emb, cfg))
                ch = cfg.channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(_norm(ch, cfg.norm_groups), nn.SiLU(), nn.Conv2d(ch, c_img, 3, padding=1))

    def forward(self, x: torch.Tensor, t, s=None) -> torch.Tensor:
        cond = self.time(x, t, s)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, cond) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, cond) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), cond) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)
