"""MeanFlow against math that cannot be faked: a finite-difference check of its JVP and the
closed-form average velocity of Gaussian data on the linear path."""
import pytest
import torch
from conftest import ExactFlowMap, gen, small_flow_map_net

from cmt_bench.losses import average_velocity as meanflow
from cmt_bench.methods.meanflow import MeanFlowConfig
from cmt_bench.paths import LinearPath

PATH = LinearPath()
F64 = torch.float64


def test_jvp_matches_central_differences():
    """du/dt along the tangent (v, 1, 0) of the real network equals (u(+h) - u(-h)) / 2h."""
    net = small_flow_map_net()
    z, v = torch.randn(64, 2, generator=gen(1), dtype=F64), torch.randn(64, 2, generator=gen(2), dtype=F64)
    t = torch.rand(64, generator=gen(3), dtype=F64) * 0.8 + 0.1
    r = t * torch.rand(64, generator=gen(4), dtype=F64)
    _, dudt = torch.func.jvp(lambda a, b, c: net(a, b, c), (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    with torch.no_grad():
        errors = [((net(z + h * v, t + h, r) - net(z - h * v, t - h, r)) / (2 * h) - dudt).abs().max().item()
                  for h in (1e-2, 1e-3, 1e-4)]
    # central differences converge as h^2 to the true derivative; float64 round-off is ~1e-10 here
    assert all(a / b > 50 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 and dudt.abs().mean() > 0.1, (errors, dudt.abs().mean())  # and not vacuous


def _batch(gaussian, n, seed):
    x0 = gaussian.sample(n, gen(seed))
    eps = torch.randn(x0.shape, generator=gen(seed + 1), dtype=F64)
    t, r = meanflow.sample_times(n, MeanFlowConfig().t_sampling, 1.0, gen(seed + 2))
    return x0, eps, t.double(), r.double()


def test_exact_average_velocity_is_its_own_target(gaussian):
    """With the exact (marginal) velocity, the MeanFlow identity holds at the exact flow map:
    the target equals u; off the map it does not, and the loss is positive."""
    x0, eps, t, r = _batch(gaussian, 512, 10)
    z = PATH.sample(x0, eps, t)
    v = gaussian.velocity(z, t)
    u, target = ExactFlowMap(gaussian)(z, t, r), meanflow.meanflow_target(ExactFlowMap(gaussian), z, t, r, v)
    assert torch.allclose(u, target, atol=1e-10)
    assert torch.allclose(u, (gaussian.flow_map(z, t, r) - z) / (r - t).unsqueeze(1), atol=1e-10)
    off = ExactFlowMap(gaussian, scale=0.1)
    assert (off(z, t, r) - meanflow.meanflow_target(off, z, t, r, v)).pow(2).mean() > 1e-4


def test_loss_gradient_vanishes_at_the_exact_map(gaussian):
    """Trained with the conditional velocity eps - x_0 (what the loss sees), the target is linear
    in v, so its conditional mean is the exact target: at the exact map the gradient is zero up
    to sampling noise, off the map it points back toward it."""
    x0, eps, t, r = _batch(gaussian, 400_000, 20)
    cfg = MeanFlowConfig(adaptive_p=0.0)  # the plain squared error, whose minimiser is the conditional mean

    def grad(scale):
        a = torch.tensor(scale, dtype=F64, requires_grad=True)
        net, z = ExactFlowMap(gaussian, scale=a), PATH.sample(x0, eps, t)
        target = meanflow.meanflow_target(net, z, t, r, PATH.velocity_target(x0, eps))
        assert not target.requires_grad  # stop-gradient: the gradient flows through u alone
        meanflow.adaptive_weighted(net(z, t, r) - target, cfg.adaptive_p, cfg.adaptive_c).backward()
        return a.grad.item()

    off = grad(0.1)
    assert off > 0
    assert abs(grad(0.0)) < 0.02 * off


def test_time_sampling():
    t, r = meanflow.sample_times(100_000, MeanFlowConfig().t_sampling, 0.25, gen(5))
    assert (t >= r).all() and ((t > 0) & (t < 1)).all()
    assert (t != r).float().mean() == pytest.approx(0.25, abs=0.01)
    t, r = meanflow.sample_times(1000, MeanFlowConfig().t_sampling, 0.0, gen(6))
    assert torch.equal(t, r)


def test_adaptive_weight():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.1]])
    assert meanflow.adaptive_weighted(delta, 0.0, 1e-3) == pytest.approx((25 + 0.01) / 2)
    # p = 1: each sample contributes |d|^2 / (|d|^2 + c), so a large residual no longer dominates
    assert meanflow.adaptive_weighted(delta, 1.0, 1e-3) == pytest.approx((25 / 25.001 + 0.01 / 0.011) / 2)
