"""sCT on the linear path against math that cannot be faked: its tangent is the total derivative of
the consistency function (central differences), without stabilisers it is MeanFlow's loss at r = 0,
and its gradient vanishes at the exact Gaussian flow map and points back to it off the map."""
import pytest
import torch
from conftest import ExactFlowMap, gen, small_flow_map_net as real_net

from cmt_bench import nets
from cmt_bench.losses.average_velocity import adaptive_weighted, meanflow_target
from cmt_bench.methods import sct
from cmt_bench.methods.sct import SctConfig
from cmt_bench.paths import LinearPath

PATH = LinearPath()
F64 = torch.float64
PLAIN = SctConfig(tangent="none", warmup_images=0, adaptive_p=0.0)  # no stabiliser: the bare objective


def batch(n, seed):
    x0 = torch.randn(n, 2, generator=gen(seed), dtype=F64) * 0.5 + 0.3
    eps = torch.randn(n, 2, generator=gen(seed + 1), dtype=F64)
    t = torch.rand(n, generator=gen(seed + 2), dtype=F64) * 0.8 + 0.1
    return x0, eps, t


def tangent(net, z, t, v, rho=1.0):
    """The raw sCT tangent as the loss builds it: the regression's residual is -g."""
    u = net(z, t, torch.zeros_like(t)).detach()
    return rho * meanflow_target(net, z, t, torch.zeros_like(t), v) + (1 - rho) * v - u


def test_tangent_is_the_total_derivative_of_the_consistency_function():
    """g = d/dt f(x_t, t) along x_t = (1 - t) x0 + t eps, f(x, t) = X(x, t, 0): central differences
    converge to it as h^2 (the JVP inside meanflow_target, on a real network)."""
    net = real_net()
    x0, eps, t = batch(64, 1)
    v = PATH.velocity_target(x0, eps)
    g = tangent(net, PATH.sample(x0, eps, t), t, v)

    def f(h):
        th = t + h
        return nets.flow_map(net, PATH.sample(x0, eps, th), th, torch.zeros_like(th))

    with torch.no_grad():
        errors = [((f(h) - f(-h)) / (2 * h) - g).abs().max().item() for h in (1e-2, 1e-3, 1e-4)]
    assert all(a / b > 50 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 and g.abs().mean() > 0.1, (errors, g.abs().mean())


def test_without_stabilisers_it_is_meanflow_at_r_zero():
    """Same loss value and the same parameter gradient as MeanFlow's plain loss with r = 0."""
    net = real_net()
    x0, eps, t = batch(128, 2)
    z, v = PATH.sample(x0, eps, t), PATH.velocity_target(x0, eps)
    zeros = torch.zeros_like(t)

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])

    l_sct, g_sct = grads(sct.sct_objective(net, z, t, v, 1.0, PLAIN))
    l_mf, g_mf = grads(adaptive_weighted(net(z, t, zeros) - meanflow_target(net, z, t, zeros, v), 0.0, 1e-3))
    assert l_sct == pytest.approx(l_mf, rel=1e-12)
    assert torch.allclose(g_sct, g_mf, rtol=1e-10, atol=1e-12) and g_mf.abs().max() > 1e-3


def antithetic(gaussian, n, seed):
    """(x0, eps, t) in pairs that share x_t and mirror the posterior of (x0, eps) given x_t.

    For data mu + s xi, x_t - (1 - t) mu = a xi + b eps with a = (1 - t) s, b = t; the combination
    o = b xi - a eps is independent of it, so flipping o keeps x_t and reflects the conditional
    velocity eps - x0 about its mean E[v | x_t]. Averages over a pair then hold E[. | x_t] exactly."""
    xi, eps = (torch.randn(n, 2, generator=gen(seed + k), dtype=F64) for k in (0, 1))
    t = torch.rand(n, generator=gen(seed + 2), dtype=F64) * 0.9 + 0.05
    a, b = ((1 - t) * gaussian.s).unsqueeze(1), t.unsqueeze(1)
    p, o = a * xi + b * eps, b * xi - a * eps
    norm = a ** 2 + b ** 2
    xi2, eps2 = (a * p - b * o) / norm, (b * p + a * o) / norm
    return gaussian.mu + gaussian.s * torch.cat([xi, xi2]), torch.cat([eps, eps2]), torch.cat([t, t])


@pytest.mark.parametrize("cfg", [PLAIN, SctConfig(warmup_images=0), SctConfig(tangent="clip", warmup_images=0)],
                         ids=["plain", "normalized+adaptive", "clipped+adaptive"])
def test_gradient_vanishes_at_the_exact_map(gaussian, cfg):
    """With the conditional velocity, E[g | x_t] = df/dt along the true flow, zero at the exact map; g is
    affine in the velocity, so on antithetic pairs (same x_t, mirrored posterior) g comes in +-pairs and
    normalising, clipping and the even adaptive weight keep the gradient at zero to round-off. Off the
    map (u scaled by 1.1) E[g | x_t] != 0 and the gradient is positive: descent shrinks the scale back."""
    x0, eps, t = antithetic(gaussian, 20_000, 20)
    assert torch.allclose(PATH.sample(x0[:20_000], eps[:20_000], t[:20_000]),
                          PATH.sample(x0[20_000:], eps[20_000:], t[20_000:]), atol=1e-12)
    z, v = PATH.sample(x0, eps, t), PATH.velocity_target(x0, eps)

    def grad(scale):
        a = torch.tensor(scale, dtype=F64, requires_grad=True)
        sct.sct_objective(ExactFlowMap(gaussian, scale=a), z, t, v, 1.0, cfg).backward()
        return a.grad.item()

    off = grad(0.1)
    assert off > 0.01
    assert abs(grad(0.0)) < 1e-9 * off


def test_warmup_and_stabilisers():
    cfg = SctConfig(warmup_images=1000)
    assert [sct.warmup(n, cfg) for n in (0, 500, 1000, 5000)] == [0.0, 0.5, 1.0, 1.0]
    assert sct.warmup(0, SctConfig(warmup_images=0)) == 1.0
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-5.0, 0.5]])
    normed = sct.stabilised(g, SctConfig(tangent_c=0.1))
    assert torch.allclose(normed[0], g[0] / 5.1) and torch.equal(normed[1], g[1])
    assert torch.equal(sct.stabilised(g, SctConfig(tangent="clip")), g.clamp(-1, 1))
    assert torch.equal(sct.stabilised(g, SctConfig(tangent="none")), g)


def test_loss_runs_on_a_batch_and_trains_only_jumps_to_zero():
    """The registered loss on a real network: finite, differentiable, and it never calls the network
    with a target time other than 0 (sCT learns f(x, t) = X(x, t, 0) alone)."""
    net = real_net()
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[2].abs().max().item()))
    x0 = torch.randn(256, 2, generator=gen(3), dtype=F64)
    loss = sct.METHOD.loss(net, PATH, x0, gen(4), 50_000, SctConfig(), None)
    loss.backward()
    assert torch.isfinite(loss) and seen and max(seen) == 0.0
