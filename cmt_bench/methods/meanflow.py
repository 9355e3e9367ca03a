"""MeanFlow (Geng et al. 2025): learn the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r)
through the MeanFlow identity u = v - (t - r) du/dt, with du/dt the total derivative along the
probability-flow ODE (tangent dz = v, dt = 1, dr = 0), computed by one forward-mode JVP.

In this package's convention the network is u_theta(x, s, t) called as net(x, t, s) with s the
target time, so MeanFlow's u(z_t, r, t) is net(z_t, t, r) and X(z_t, t, r) = z_t + (r - t) u.
CMT-MF (jumps between any two trajectory points) initialises it.
"""
from typing import Annotated

import torch
from pydantic import Field

from ..distributed import unwrap
from ..losses.flow_matching import gaussian_noise, logit_normal
from ..schema import PositiveFloat, Section, TimeSampling
from . import Method, register


class MeanFlowConfig(Section):
    """MeanFlow (Geng et al. 2025): (t, r) from two logit-normal draws, r = t except for a fraction
    `r_neq_t`; adaptive loss weight 1 / (|delta|^2 + adaptive_c)^adaptive_p."""
    # The paper's ImageNet density is (-0.4, 1.0). The 1-step jump is the corner (r, t) = (0, 1):
    # on Gaussian data (3000 steps) that density left its error at 0.31, (0.0, 2.0) reached 0.06.
    t_sampling: TimeSampling = TimeSampling(mean=0.0, std=2.0)
    r_neq_t: Annotated[float, Field(ge=0, le=1)] = 0.25
    adaptive_p: Annotated[float, Field(ge=0)] = 1.0
    adaptive_c: PositiveFloat = 1e-3


def sample_times(n: int, cfg: MeanFlowConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) with t >= r: two logit-normal draws, sorted; r = t (plain flow matching) for all but
    a fraction `r_neq_t` of the batch."""
    a, b = logit_normal(n, cfg.t_sampling, generator), logit_normal(n, cfg.t_sampling, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.rand(n, generator=generator) < cfg.r_neq_t
    return t, torch.where(keep, r, t)


@torch.no_grad()
def meanflow_target(net, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The stop-gradient target v - (t - r) du/dt, du/dt by one JVP of u_theta(z, r, t).

    It needs no graph, so it runs on the bare module: the loss's gradient then flows through one
    ordinary forward of the (possibly DDP-wrapped) network, where DDP synchronises it. Taking the
    loss through the JVP's primal output instead bypasses DDP's hooks (py-meanflow's pitfall)."""
    _, dudt = torch.func.jvp(lambda z_, t_, r_: unwrap(net)(z_, t_, r_), (z, t, r),
                             (v, torch.ones_like(t), torch.zeros_like(r)))
    return v - (t - r).reshape(-1, *([1] * (z.ndim - 1))) * dudt


def adaptive_weighted(delta: torch.Tensor, cfg: MeanFlowConfig) -> torch.Tensor:
    """Mean of sg(w) * |delta|^2 with w = 1 / (|delta|^2 + c)^p (p = 0: plain squared error)."""
    sq = delta.flatten(1).pow(2).sum(1)
    weight = (sq.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
    return (weight * sq).mean()


def meanflow_loss(net, path, x0: torch.Tensor, generator: torch.Generator, cfg: MeanFlowConfig) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t, r = (s.to(x0.device) for s in sample_times(x0.shape[0], cfg, generator))
    z, v = path.sample(x0, eps, t), path.velocity_target(x0, eps)
    # Where r = t the identity's JVP term is multiplied by t - r = 0 and the target is v, so the
    # JVP (about 3 forward passes) runs only on the r != t part of the batch.
    jump = t != r
    target = v.clone()
    target[jump] = meanflow_target(net, z[jump], t[jump], r[jump], v[jump])
    return adaptive_weighted(net(z, t, r) - target, cfg)


METHOD = register(Method(
    name="meanflow", label="MeanFlow", config=MeanFlowConfig, cmt_variant="mf", in_default_run=True,
    loss=lambda net, path, x0, generator, images_seen, cfg, dist: meanflow_loss(net, path, x0, generator, cfg),
    reference="Geng et al. 2025, Mean Flows for One-step Generative Modeling (arXiv 2505.13447)",
    paper={1: "no MeanFlow figure against a diffusion init; the CMT init 'outperforms random and diffusion-based "
              "baselines', with figures for consistency models (CIFAR-10: 2-step FID 1.97 with up to 98% less data "
              "and GPU time)",
           2: "ImageNet 256: MeanFlow from CMT, 1-step FID 3.34 vs 3.43 from scratch (random init), with about 50% "
              "less total training time",
           3: "ImageNet 256: MeanFlow from CMT, 1-step FID 3.34 vs 3.43 from scratch, at about 50% of the training "
              "time"},
    saving="about 50% less", from_scratch="3.34 vs 3.43 FID"))
