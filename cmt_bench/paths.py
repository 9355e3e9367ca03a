"""Probability paths x_t = alpha(t) x_0 + sigma(t) eps, t in [0, 1] (t = 1 is pure noise).

One path is shared by every stage. A path knows how to noise data and what the conditional
velocity target is; a new path (e.g. EDM's sigma-path) is another small class with the same API.
"""
from __future__ import annotations

import torch


class LinearPath:
    """Rectified-flow / flow-matching path: alpha = 1 - t, sigma = t, velocity eps - x_0."""

    name = "linear"

    @staticmethod
    def alpha(t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t

    def sample(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _col(t, x0)
        return self.alpha(t) * x0 + self.sigma(t) * eps

    @staticmethod
    def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps - x0

    @staticmethod
    def noise_to_signal(t: torch.Tensor) -> torch.Tensor:
        """sigma/alpha, the EDM sigma of the same noise level (for ECT's dt schedule)."""
        return t / (1 - t).clamp_min(1e-6)


class GaussianFlow:
    """Exact quantities of the linear path when the data are N(mu, s^2 I).

    x_t = (1 - t) mu + sd(t) z with sd(t)^2 = (1 - t)^2 s^2 + t^2, so the probability-flow ODE
    moves each point along fixed z and the flow map is affine: X(x, t, r) = (1 - r) mu + sd(r)/sd(t)
    (x - (1 - t) mu). These are the ground truth the method tests compare against.
    """

    def __init__(self, mu: torch.Tensor, s: float):
        self.mu, self.s = mu, float(s)

    def sd(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((1 - t) ** 2 * self.s**2 + t**2)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _col(t, x)
        dsd = (t - (1 - t) * self.s**2) / self.sd(t)  # d sd(t) / dt
        return -self.mu + dsd / self.sd(t) * (x - (1 - t) * self.mu)

    def flow_map(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        t, r = _col(t, x), _col(r, x)
        return (1 - r) * self.mu + self.sd(r) / self.sd(t) * (x - (1 - t) * self.mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mu + self.s * torch.randn(n, self.mu.numel(), generator=generator, dtype=self.mu.dtype)


def noise(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise (t = 1) that samples start from at `seed`, on the CPU, and a second draw for a 2-step
    sampler's re-noising: the samplers, the teacher's ODE scoring and the exact map's targets share it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randn(n, *shape, generator=gen)


def _col(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample time (shape [B] or scalar) against a batch of shape [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


PATHS = {"linear": LinearPath}
