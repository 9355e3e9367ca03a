"""Continuous-time consistency training, sCT (Lu & Song 2024), on the linear path.

The consistency function is the flow map to time 0, f(x, t) = x - t u(x, 0, t), as for ECT. sCT
trains it with the continuous-time limit of the consistency loss, whose gradient is that of
E[<f_theta(x_t, t), sg(df/dt)>] with df/dt = (v - u) - t du/dt the total derivative along the path
(tangent dx = v, the conditional velocity eps - x0, dt = 1), taken by one JVP. As a regression it is
|u - sg(u + g)|^2 with the tangent g = df/dt: without the stabilisers below, exactly MeanFlow's loss
at r = 0 (tested). sCM's stabilisers, carried over from its TrigFlow parametrisation:
- tangent warmup: the t du/dt term enters with weight min(1, images seen / warmup_images);
- tangent normalisation g / (|g| + c), or clipping to [-1, 1];
- adaptive weighting: sCM learns a log-variance w(t) with a small extra network; a method here owns
  no parameters, so MeanFlow's per-sample stop-gradient weight 1 / (|g|^2 + c)^p stands in (the same
  role: every sample's loss brought to about one).
At the exact flow map E[g | x_t] = 0, and g given x_t is symmetric for Gaussian data, so the
normalised, clipped and weighted gradient vanishes there too (tested). CMT-CM (a jump to time 0)
initialises it.
"""
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..losses.average_velocity import adaptive_weighted, meanflow_target
from ..losses.flow_matching import gaussian_noise, logit_normal
from ..schema import PositiveFloat, Section, TimeSampling
from . import Method, register


class SctConfig(Section):
    """sCT (Lu & Song 2024) on the linear path: t logit-normal, tangent warmup, normalisation or
    clipping, per-sample adaptive weight 1 / (|g|^2 + adaptive_c)^adaptive_p."""
    # sCM's proposal log(sigma) ~ N(-1.0, 1.4); logit(t) = log(sigma) on the linear path
    t_sampling: TimeSampling = TimeSampling(mean=-1.0, std=1.4)
    tangent: Literal["normalize", "clip", "none"] = "normalize"
    tangent_c: PositiveFloat = 0.1  # g / (|g| + c): sCM's constant
    # sCM warms the tangent up over 10k iterations; 0 starts with the full tangent
    warmup_images: Annotated[int, Field(ge=0, strict=True)] = 100_000
    adaptive_p: Annotated[float, Field(ge=0)] = 1.0
    adaptive_c: PositiveFloat = 1e-3


def warmup(images_seen: int, cfg: SctConfig) -> float:
    return 1.0 if cfg.warmup_images == 0 else min(1.0, images_seen / cfg.warmup_images)


def stabilised(g: torch.Tensor, cfg: SctConfig) -> torch.Tensor:
    if cfg.tangent == "normalize":
        return g / (g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1))) + cfg.tangent_c)
    if cfg.tangent == "clip":
        return g.clamp(-1, 1)
    return g


def sct_objective(net, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor, rho: float, cfg: SctConfig) -> torch.Tensor:
    """The loss at given x_t = z, times t and velocities v, with tangent warmup weight rho."""
    zeros = torch.zeros_like(t)
    u = net(z, t, zeros)
    # meanflow_target at r = 0 is v - t du/dt = u + df/dt, so the tangent with warmup is
    # (v - u) - rho t du/dt = rho * target + (1 - rho) * v - u
    tangent = rho * meanflow_target(net, z, t, zeros, v) + (1 - rho) * v - u.detach()
    g = stabilised(tangent, cfg)
    return adaptive_weighted(u - (u.detach() + g), cfg.adaptive_p, cfg.adaptive_c)


def sct_loss(net, path, x0: torch.Tensor, generator: torch.Generator, images_seen: int, cfg: SctConfig) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t = logit_normal(x0.shape[0], cfg.t_sampling, generator).to(x0.device)
    return sct_objective(net, path.sample(x0, eps, t), t, path.velocity_target(x0, eps), warmup(images_seen, cfg), cfg)


METHOD = register(Method(
    name="sct", label="sCT", config=SctConfig, cmt_variant="cm",
    loss=lambda net, path, x0, generator, images_seen, cfg, dist: sct_loss(net, path, x0, generator, images_seen, cfg),
    reference="Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models "
              "(arXiv 2410.11081): 2-step FID 2.06 on CIFAR-10, 1.48 on ImageNet 64 (its abstract)"))
