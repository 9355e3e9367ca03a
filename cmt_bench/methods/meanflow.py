"""MeanFlow (Geng et al. 2025): learn the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r)
through the MeanFlow identity u = v - (t - r) du/dt (losses/average_velocity.py), with the
conditional velocity eps - x0 for v. CMT-MF (jumps between any two trajectory points) initialises it.
"""
from typing import Annotated

import torch
from pydantic import Field

from ..losses.average_velocity import adaptive_weighted, meanflow_target, sample_times
from ..losses.flow_matching import gaussian_noise
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


def meanflow_loss(net, path, x0: torch.Tensor, generator: torch.Generator, cfg: MeanFlowConfig) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t, r = (s.to(x0.device) for s in sample_times(x0.shape[0], cfg.t_sampling, cfg.r_neq_t, generator))
    z, v = path.sample(x0, eps, t), path.velocity_target(x0, eps)
    # Where r = t the identity's JVP term is multiplied by t - r = 0 and the target is v, so the
    # JVP (about 3 forward passes) runs only on the r != t part of the batch.
    jump = t != r
    target = v.clone()
    target[jump] = meanflow_target(net, z[jump], t[jump], r[jump], v[jump])
    return adaptive_weighted(net(z, t, r) - target, cfg.adaptive_p, cfg.adaptive_c)


METHOD = register(Method(
    name="meanflow", label="MeanFlow", config=MeanFlowConfig, cmt_variant="mf", in_default_run=True,
    two_step="chain",  # MeanFlow's 2-NFE samples step its average velocity 1 -> t_mid -> 0 (no re-noising)
    loss=lambda net, path, x0, generator, images_seen, cfg, dist: meanflow_loss(net, path, x0, generator, cfg),
    reference="Geng et al. 2025, Mean Flows for One-step Generative Modeling (arXiv 2505.13447)",
    paper={1: "no MeanFlow figure against a diffusion init; the CMT init 'outperforms random and diffusion-based "
              "baselines', with figures for consistency models (CIFAR-10: 2-step FID 1.97 with up to 98% less data "
              "and GPU time)",
           2: "ImageNet 256: MeanFlow from CMT, 1-step FID 3.34 vs 3.43 from scratch (random init), with about 50% "
              "less total training time",
           3: "ImageNet 256: MeanFlow from CMT, 1-step FID 3.34 vs 3.43 from scratch, at about 50% of the training "
              "time"},
    saving="about 50% less", from_scratch="3.34 vs 3.43 FID",
    # "about 50% of the total training time of MeanFlow from scratch": everything counted
    accounting={2: "total", 3: "total"}))
