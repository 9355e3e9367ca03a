"""A test-only post-training method, dropped into cmt_bench/methods/ by test_plugins: keep training
the flow-map network by flow matching on its diagonal u(x, t, t) = v(x, t), the plainest baseline a
researcher would add. Everything about it is in this one module."""
import torch

from ..losses.flow_matching import gaussian_noise, logit_normal
from ..schema import Section, TimeSampling
from . import Method, register


class FmBaselineConfig(Section):
    t_sampling: TimeSampling = TimeSampling()


def loss(net, path, x0, generator: torch.Generator, images_seen: int, cfg: FmBaselineConfig, dist) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t = logit_normal(x0.shape[0], cfg.t_sampling, generator).to(x0.device)
    return (net(path.sample(x0, eps, t), t, t) - path.velocity_target(x0, eps)).flatten(1).pow(2).mean()


METHOD = register(Method(name="fm_baseline", label="FM-baseline", config=FmBaselineConfig, loss=loss,
                         cmt_variant="mf", reference="test-only: flow matching on the flow map's diagonal"))
