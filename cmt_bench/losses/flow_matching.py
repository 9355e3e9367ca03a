"""Diffusion / flow-matching pre-training of the teacher velocity field v(x, t)."""
import torch

from ..schema import TimeSampling


def logit_normal(n: int, cfg: TimeSampling, generator: torch.Generator, eps: float = 1e-4) -> torch.Tensor:
    t = torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator, device=generator.device))
    return t.clamp(eps, 1 - eps)


def gaussian_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device and then moved to x's: a
    CPU generator (compute.draws host) gives the same numbers whatever x's device."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def flow_matching_loss(net, path, x0: torch.Tensor, generator: torch.Generator, t_cfg: TimeSampling) -> torch.Tensor:
    eps = gaussian_noise(x0, generator)
    t = logit_normal(x0.shape[0], t_cfg, generator).to(x0.device)
    v = net(path.sample(x0, eps, t), t)
    return (v - path.velocity_target(x0, eps)).flatten(1).pow(2).mean(1).mean()
