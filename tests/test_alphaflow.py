"""AlphaFlow against its two end points and the exact Gaussian flow map: at alpha = 1 it is trajectory
flow matching, as alpha -> 0 its gradient converges (linearly) to MeanFlow's, and with the exact
velocity its target misses the exact average velocity by O(alpha^2), a residual of O(alpha) in the
loss's units, while off the map it does not vanish."""
import pytest
import torch
from conftest import ExactFlowMap, gen, small_flow_map_net as real_net

from cmt_bench.losses.average_velocity import adaptive_weighted, meanflow_target
from cmt_bench.methods import alphaflow
from cmt_bench.methods.alphaflow import AlphaFlowConfig
from cmt_bench.paths import LinearPath

PATH = LinearPath()
F64 = torch.float64


def batch(n, seed, jump_fraction=1.0):
    x0 = torch.randn(n, 2, generator=gen(seed), dtype=F64) * 0.5 + 0.3
    eps = torch.randn(n, 2, generator=gen(seed + 1), dtype=F64)
    t = torch.rand(n, generator=gen(seed + 2), dtype=F64) * 0.8 + 0.15
    r = t * torch.rand(n, generator=gen(seed + 3), dtype=F64)
    r = torch.where(torch.rand(n, generator=gen(seed + 4), dtype=F64) < jump_fraction, r, t)
    return PATH.sample(x0, eps, t), t, r, PATH.velocity_target(x0, eps)


def grads(net, loss):
    net.zero_grad()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in net.parameters()])


def test_schedule():
    cfg = AlphaFlowConfig(anneal_start_images=100, anneal_end_images=1100, gamma=25.0, clamp=0.005)
    values = [alphaflow.alpha(n, cfg) for n in range(0, 1300, 50)]
    assert values[0] == values[2] == 1.0 and values[-1] == 0.0  # before, at the start, after the end
    assert alphaflow.alpha(600, cfg) == pytest.approx(0.5)  # the sigmoid's midpoint
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing
    assert all(v in (0.0, 1.0) or 0.005 <= v <= 0.995 for v in values)  # the clamp
    with pytest.raises(ValueError, match="anneal_end_images"):
        AlphaFlowConfig(anneal_start_images=10, anneal_end_images=10)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_alpha_one_is_trajectory_flow_matching(p):
    """alpha = 1: every jump u(x_t, r, t) is regressed onto the conditional velocity (and r = t is
    flow matching), the same value and gradient as the adaptive-weighted |u - v|^2."""
    net, cfg = real_net(), AlphaFlowConfig(adaptive_p=p)
    z, t, r, v = batch(128, 1, jump_fraction=0.5)
    loss, g = grads(net, alphaflow.alphaflow_objective(net, z, t, r, v, 1.0, cfg))
    ref, g_ref = grads(net, adaptive_weighted(net(z, t, r) - v, p, cfg.adaptive_c))
    assert loss == pytest.approx(ref, rel=1e-12) and torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_gradient_tends_to_meanflows_as_alpha_vanishes(p):
    """On a real network the alpha-Flow gradient differs from MeanFlow's by O(alpha): each 10x smaller
    alpha cuts the difference about 10x, and alpha = 0 (the clamped end) is MeanFlow's exactly."""
    net, cfg = real_net(), AlphaFlowConfig(adaptive_p=p)
    z, t, r, v = batch(256, 2, jump_fraction=0.75)
    _, g_mf = grads(net, adaptive_weighted(net(z, t, r) - meanflow_target(net, z, t, r, v), p, cfg.adaptive_c))
    errors = [(grads(net, alphaflow.alphaflow_objective(net, z, t, r, v, a, cfg))[1] - g_mf).norm().item()
              / g_mf.norm().item() for a in (1e-1, 1e-2, 1e-3)]
    assert all(5 < e1 / e2 < 20 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2 and errors[0] > 1e-3, errors  # converging, and alpha = 0.1 is really different
    _, g_zero = grads(net, alphaflow.alphaflow_objective(net, z, t, r, v, 0.0, cfg))
    assert torch.allclose(g_zero, g_mf, rtol=1e-10, atol=1e-14)


def test_target_at_the_exact_map(gaussian):
    """With the exact (marginal) velocity the shortcut target at the exact map is off by O(alpha^2):
    the residual in the loss's units, (u - target) / alpha, shrinks linearly with alpha (a first-order
    discretisation of MeanFlow's identity); off the map it tends to MeanFlow's residual, not zero."""
    x0 = gaussian.sample(2048, gen(5))
    eps = torch.randn(x0.shape, generator=gen(6), dtype=F64)
    t = torch.rand(2048, generator=gen(7), dtype=F64) * 0.8 + 0.15
    r = t * torch.rand(2048, generator=gen(8), dtype=F64)
    z = PATH.sample(x0, eps, t)
    v = gaussian.velocity(z, t)

    def residual(net, a):
        return ((net(z, t, r) - alphaflow.alphaflow_target(net, z, t, r, v, a)) / a).pow(2).sum(1).mean().sqrt().item()

    exact = [residual(ExactFlowMap(gaussian), a) for a in (0.1, 0.01, 0.001)]
    assert all(8 < e1 / e2 < 12 for e1, e2 in zip(exact, exact[1:])), exact
    off = [residual(ExactFlowMap(gaussian, scale=0.1), a) for a in (0.1, 0.01, 0.001)]
    assert min(off) > 0.03 and min(off) > 100 * exact[-1], (off, exact)


def test_loss_runs_on_a_batch_through_the_curriculum():
    """The registered loss on a real network at the three phases: finite and differentiable."""
    cfg = AlphaFlowConfig(anneal_start_images=0, anneal_end_images=1000)
    for images in (0, 500, 5000):
        net = real_net()
        x0 = torch.randn(256, 2, generator=gen(3), dtype=F64)
        loss = alphaflow.METHOD.loss(net, PATH, x0, gen(4), images, cfg, None)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
