"""AlphaFlow (Zhang et al. 2025): a curriculum from trajectory flow matching to MeanFlow.

The alpha-Flow loss regresses the average velocity u(z_t, r, t) = net(z_t, t, r) onto
    alpha v + (1 - alpha) u_sg(z_s, r, s),   s = t - alpha (t - r),
with weight 1/alpha, where v = eps - x0 is the conditional velocity and z_s the same noise at time s
(for the linear path z_t - alpha (t - r) v). At alpha = 1 the target is v: trajectory flow matching;
as alpha -> 0 the gradient tends to MeanFlow's (u_sg(z_s, r, s) = u - alpha (t - r) du/dt + O(alpha^2));
in between it is a shortcut-model step of relative size alpha. Both end points are tested against
the existing pieces. alpha follows a sigmoid in images seen from 1 to 0; below `clamp` it is 0 and
the step is MeanFlow's JVP, above 1 - clamp it is 1 (the official code's schedule, in images).

The adaptive weight sees the residual divided by alpha (the quantity that tends to MeanFlow's
residual), so alpha -> 0 gives MeanFlow's loss gradient exactly; the official code's weight
alpha / (|delta|^2 + c) is the same with c / alpha^2. CMT-MF (jumps between any two trajectory
points) initialises it. Starting at alpha = 1 regresses every jump onto the instantaneous velocity,
so from a CMT init the curriculum first undoes part of the flow map; `anneal_start_images` and a
short anneal are how a study can ask whether that matters.
"""
import math
from typing import Annotated

import torch
from pydantic import Field, model_validator

from ..distributed import unwrap
from ..losses.average_velocity import adaptive_weighted, meanflow_target, sample_times
from ..losses.flow_matching import gaussian_noise
from ..schema import PositiveFloat, Probability, Section, TimeSampling
from . import Method, register


class AlphaFlowConfig(Section):
    """AlphaFlow (Zhang et al. 2025): (t, r) as MeanFlow's, alpha annealed by a sigmoid in images
    seen from 1 at `anneal_start_images` to 0 at `anneal_end_images` (steepness `gamma`)."""
    t_sampling: TimeSampling = TimeSampling(mean=0.0, std=2.0)  # as MeanFlow's default here
    r_neq_t: Annotated[float, Field(ge=0, le=1)] = 0.5  # the official ImageNet B/2 run: ratio_fm 0.5
    adaptive_p: Annotated[float, Field(ge=0)] = 1.0
    adaptive_c: PositiveFloat = 1e-3
    # The official runs anneal over the whole training (B/2: 0 to 400k steps, gamma 25, clamp 0.005);
    # here the default budget of post-training, in images.
    anneal_start_images: Annotated[int, Field(ge=0, strict=True)] = 0
    anneal_end_images: Annotated[int, Field(gt=0, strict=True)] = 1_000_000
    gamma: PositiveFloat = 25.0
    clamp: Probability = 0.005

    @model_validator(mode="after")
    def _ordered(self) -> "AlphaFlowConfig":
        if self.anneal_end_images <= self.anneal_start_images:
            raise ValueError(f"anneal_end_images ({self.anneal_end_images}) must exceed anneal_start_images "
                             f"({self.anneal_start_images})")
        return self


def alpha(images_seen: int, cfg: AlphaFlowConfig) -> float:
    """1 before the anneal, a sigmoid from 1 to 0 across it, 0 after; clamped to 0 or 1 at the ends."""
    start, end = cfg.anneal_start_images, cfg.anneal_end_images
    if images_seen <= start:
        a = 1.0
    elif images_seen >= end:
        a = 0.0
    else:
        progress = (images_seen - (start + end) / 2) / (end - start)
        a = 1.0 - 1.0 / (1.0 + math.exp(-cfg.gamma * progress))
    return 0.0 if a < cfg.clamp else 1.0 if a > 1 - cfg.clamp else a


@torch.no_grad()
def alphaflow_target(net, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, a: float) -> torch.Tensor:
    """alpha v + (1 - alpha) u(z_s, r, s) with s = t - alpha (t - r) and z_s = z - alpha (t - r) v (for the
    conditional velocity, the same noise at time s); MeanFlow's JVP target at alpha = 0."""
    if a == 0.0:
        return meanflow_target(net, z, t, r, v)
    if a == 1.0:
        return v
    step = a * (t - r)
    # on the bare module, as meanflow_target: DDP's hooks see only the loss's one forward
    u_s = unwrap(net)(z - step.reshape(-1, *([1] * (z.ndim - 1))) * v, t - step, r)
    return a * v + (1 - a) * u_s


def alphaflow_objective(net, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, a: float,
                        cfg: AlphaFlowConfig) -> torch.Tensor:
    """The alpha-Flow loss at x_t = z, times (t, r) and velocities v; r = t samples are flow matching."""
    jump = t != r
    target = v.clone()
    target[jump] = alphaflow_target(net, z[jump], t[jump], r[jump], v[jump], a)
    scale = torch.ones_like(t)
    if a > 0.0:
        scale[jump] = a  # the 1/alpha weight, with the residual measured in units of alpha
    return adaptive_weighted(net(z, t, r) - target, cfg.adaptive_p, cfg.adaptive_c, scale=scale)


def alphaflow_loss(net, path, x0: torch.Tensor, generator: torch.Generator, images_seen: int,
                   cfg: AlphaFlowConfig) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t, r = (s.to(x0.device) for s in sample_times(x0.shape[0], cfg.t_sampling, cfg.r_neq_t, generator))
    z, v = path.sample(x0, eps, t), path.velocity_target(x0, eps)
    return alphaflow_objective(net, z, t, r, v, alpha(images_seen, cfg), cfg)


METHOD = register(Method(
    name="alphaflow", label="AlphaFlow", config=AlphaFlowConfig, cmt_variant="mf", two_step="chain",
    loss=lambda net, path, x0, generator, images_seen, cfg, dist: alphaflow_loss(net, path, x0, generator,
                                                                                  images_seen, cfg),
    cost_phases=lambda cfg: {"alpha=1": cfg.anneal_start_images,  # no extra pass
                             "alpha=0.5": (cfg.anneal_start_images + cfg.anneal_end_images) // 2,  # + a no-grad forward
                             "alpha=0": cfg.anneal_end_images},  # MeanFlow's JVP
    reference="Zhang et al. 2025, AlphaFlow: Understanding and Improving MeanFlow Models (arXiv 2510.20771): "
              "ImageNet 256, alpha-Flow-XL/2+ from scratch, 1-step FID 2.58, 2-step 2.15 (its abstract)"))
