"""Networks. A flow-map network takes two times: u_theta(x, s, t) with X(x, t, s) = x + (s - t) u.

The second time enters as the gap t - s through its own embedding whose last layer starts at
zero, so a diffusion teacher's weights (trained with `two_times=False`) load unchanged and the
flow-map network starts out equal to the teacher's velocity field. Vectors (toy data) get an MLP,
images the UNet of `unet.py`; both share this time conditioning.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .linear import Linear
from .schema import NetConfig


class FourierTime(nn.Module):
    """Fixed sinusoidal features of a scalar time followed by a small MLP."""

    def __init__(self, features: int, out: int, max_freq: float):
        super().__init__()
        # not persistent: the frequencies come from the config, not from a checkpoint
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), features // 2)), persistent=False)
        self.mlp = nn.Sequential(Linear(2 * (features // 2), out), nn.SiLU(), Linear(out, out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1) * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class TimeConditioning(nn.Module):
    """cond(t, s) = emb_t(t) + emb_gap(t - s); emb_gap's last layer starts at zero (see above)."""

    def __init__(self, cfg: NetConfig, width: int, two_times: bool):
        super().__init__()
        self.two_times = two_times
        self.emb_t = FourierTime(cfg.time_features, width, cfg.time_max_freq)
        if two_times:
            self.emb_gap = FourierTime(cfg.time_features, width, cfg.time_max_freq)
            nn.init.zeros_(self.emb_gap.mlp[-1].weight)
            nn.init.zeros_(self.emb_gap.mlp[-1].bias)

    def forward(self, x: torch.Tensor, t, s=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        cond = self.emb_t(t)
        if self.two_times:
            s = t if s is None else torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
            cond = cond + self.emb_gap(t - s)
        return cond


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin1, self.lin2 = Linear(width, width), Linear(width, width)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.lin2(nn.functional.silu(self.lin1(nn.functional.silu(self.norm(h) + cond))))


class FlowMapMLP(nn.Module):
    """u_theta(x, s, t) for vector data. With two_times=False it is a plain velocity net v(x, t)."""

    def __init__(self, dim: int, cfg: NetConfig, two_times: bool = True):
        super().__init__()
        self.inp = Linear(dim, cfg.hidden)
        self.time = TimeConditioning(cfg, cfg.hidden, two_times)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.hidden) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.SiLU(), Linear(cfg.hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.time(x, t, s)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)


def flow_map(net: nn.Module, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X(x, t, s) = x + (s - t) u(x, s, t): jump from time t to time s."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return x + (s - t).reshape(-1, *([1] * (x.ndim - 1))) * net(x, t, s)


def build(shape: tuple[int, ...], cfg: NetConfig, two_times: bool = True) -> nn.Module:
    """The network for samples of `shape`: (D,) vectors -> MLP, (C, H, W) images -> UNet."""
    if cfg.kind == "mlp":
        if len(shape) != 1:
            raise ValueError(f"net.kind='mlp' takes vectors; the data are {tuple(shape)} images: use net.kind='unet'")
        return FlowMapMLP(shape[0], cfg, two_times)
    from .unet import UNet
    if len(shape) != 3:
        raise ValueError(f"net.kind='unet' takes images (C, H, W); the data have shape {tuple(shape)}")
    return UNet(tuple(shape), cfg, two_times)


def load_teacher_into(flow_net: nn.Module, teacher_state: dict) -> None:
    """Copy a one-time teacher's weights into a two-time flow-map net; only a gap embedding (a module
    named emb_gap, here or in teacher_import.GapConditioned) may be missing."""
    try:
        missing, unexpected = flow_net.load_state_dict(teacher_state, strict=False)
    except RuntimeError as err:  # shapes differ: the nets were built with different `net` params
        raise ValueError(f"teacher weights do not fit the flow-map network: {err}") from None
    bad = [k for k in missing if "emb_gap" not in k.split(".")] + list(unexpected)
    if bad:
        raise ValueError(f"teacher weights do not fit the flow-map network: {bad[:5]}")
