"""The average-velocity (MeanFlow) identity, shared by the flow-map methods that train through it
(MeanFlow, AlphaFlow, sCT on the linear path).

In this package's convention the network is u_theta(x, s, t) called as net(x, t, s) with s the
target time, so MeanFlow's u(z_t, r, t) is net(z_t, t, r) and X(z_t, t, r) = z_t + (r - t) u. The
identity u = v - (t - r) du/dt holds for the exact average velocity, with du/dt the total derivative
along the probability-flow ODE (tangent dz = v, dt = 1, dr = 0), computed by one forward-mode JVP.
"""
import torch

from ..compiling import total_derivative
from .flow_matching import logit_normal
from ..schema import TimeSampling


def sample_times(n: int, t_sampling: TimeSampling, r_neq_t: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) with t >= r: two logit-normal draws, sorted; r = t (plain flow matching) for all but
    a fraction `r_neq_t` of the batch."""
    a, b = logit_normal(n, t_sampling, generator), logit_normal(n, t_sampling, generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.rand(n, generator=generator, device=generator.device) < r_neq_t
    return t, torch.where(keep, r, t)


@torch.no_grad()
def meanflow_target(net, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The stop-gradient target v - (t - r) du/dt, du/dt by one JVP of u_theta(z, r, t).

    It needs no graph, so it runs on the bare module: the loss's gradient then flows through one
    ordinary forward of the (possibly DDP-wrapped) network, where DDP synchronises it. Taking the
    loss through the JVP's primal output instead bypasses DDP's hooks (py-meanflow's pitfall)."""
    dudt = total_derivative(net, z, t, r, v)
    return v - (t - r).reshape(-1, *([1] * (z.ndim - 1))) * dudt


def adaptive_weighted(delta: torch.Tensor, p: float, c: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of sg(w) * |delta|^2 with w = 1 / (|delta|^2 + c)^p (p = 0: plain squared error).

    `scale` (per sample, > 0) measures delta in units of scale: the term becomes
    scale * w(delta / scale) * |delta / scale|^2, whose gradient is that of |delta|^2 / scale weighted
    by w of the rescaled residual (AlphaFlow's 1/alpha, see methods/alphaflow.py)."""
    if scale is not None:
        delta = delta / scale.reshape(-1, *([1] * (delta.ndim - 1)))
    sq = delta.flatten(1).pow(2).sum(1)
    weight = (sq.detach() + c).pow(-p)
    return (weight * sq * (1 if scale is None else scale)).mean()
