"""Easy Consistency Tuning (Geng et al. 2024) on the linear path.

The consistency function is the flow map to time 0, f(x, t) = X(x, t, 0). Pairs (x_t, x_r) share
the same noise, r = t - dt, the r-branch is under stop-gradient and r = 0 pins it to the data
(X(x, 0, 0) = x). Loss weight 1/(t - r). CMT-CM (a jump to time 0) initialises it.
"""
import math
from typing import Annotated

import torch
from pydantic import Field

from ..losses.distance import distance
from ..losses.flow_matching import gaussian_noise, logit_normal
from ..nets import flow_map
from ..schema import Distance, Section, TimeSampling
from . import Method, register


class EctConfig(Section):
    """ECT (Geng et al. 2024): r = t - dt, dt = t * (1 + k*sigmoid(-b*sigma(t))) / q**(stage+1),
    stage = images_seen // stage_images (0 keeps stage 0), r clamped at 0."""
    q: Annotated[float, Field(gt=1)] = 2.0
    k: Annotated[float, Field(ge=0)] = 8.0
    b: Annotated[float, Field(ge=0)] = 1.0
    stage_images: Annotated[int, Field(ge=0, strict=True)] = 100_000
    t_sampling: TimeSampling = TimeSampling(mean=-1.1, std=2.0)


# dt stops shrinking at t / MAX_SHRINK: further down, t - dt rounds to t in float32 and the loss's
# 1/(t - r) became NaN (measured: q=2 with a stage per 2048 images diverged at stage 24 on every lr)
MAX_SHRINK = 2.0 ** 12


def ect_r(t: torch.Tensor, images_seen: int, cfg: EctConfig, path) -> torch.Tensor:
    """ECT's schedule with EDM's sigma replaced by the path's noise-to-signal ratio: dt shrinks by
    a factor q every `stage_images` images, starting at dt >= t (r = 0, a denoising loss)."""
    stage = images_seen // cfg.stage_images if cfg.stage_images else 0
    adj = 1 + cfg.k * torch.sigmoid(-cfg.b * path.noise_to_signal(t))
    cap = max(cfg.q, MAX_SHRINK)  # a fixed q above the cap is the user's choice
    shrink = cap if (stage + 1) * math.log(cfg.q) >= math.log(cap) else cfg.q ** (stage + 1)  # no float overflow
    return (t - t * adj / shrink).clamp_min(0)


def consistency_loss(net, x_t, t, x_r, r, dist: Distance) -> torch.Tensor:
    zeros = torch.zeros_like(t)
    f_t = flow_map(net, x_t, t, zeros)
    with torch.no_grad():
        f_r = flow_map(net, x_r, r, zeros)
    return (distance(f_t, f_r, dist) / (t - r)).mean()


def ect_loss(net, path, x0, generator: torch.Generator, images_seen: int, cfg: EctConfig, dist: Distance):
    eps = gaussian_noise(x0, generator)
    t = logit_normal(x0.shape[0], cfg.t_sampling, generator).to(x0.device)
    r = ect_r(t, images_seen, cfg, path)
    return consistency_loss(net, path.sample(x0, eps, t), t, path.sample(x0, eps, r), r, dist)


METHOD = register(Method(
    name="ect", label="ECT", config=EctConfig, loss=ect_loss, cmt_variant="cm", uses_distance=True,
    in_default_run=True, reference="Geng et al. 2024, Consistency Models Made Easy (arXiv 2406.14548)",
    paper={1: "CIFAR-10: 2-step FID 1.97 with up to 98% less data and GPU time than consistency models such as "
              "ECT, which start from diffusion weights",
           2: "the same 'up to 98% less data and GPU time', read here against post-training without any "
              "pre-training (random init)"},
    saving="up to 98% less",
    # the paper's consistency-model runs (and sony/cmt) start from public EDM / EDM2 checkpoints: they
    # count mid- plus post-training, never the teacher's pre-training
    accounting={1: "given_teacher", 2: "given_teacher"}))
