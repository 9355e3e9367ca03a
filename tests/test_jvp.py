"""The lean forward-mode rules (cmt_bench/jvp.py) against torch's own forward-mode AD and against
central differences, in float64: each layer rule with and without tangents on its weights, and the
total derivative of the MLP and the UNet (contiguous and channels-last) that MeanFlow's loss takes."""
import pytest
import torch
import torch.nn.functional as F
from conftest import gen, small_flow_map_net, small_unet_config

from cmt_bench import compiling, config, jvp, nets

F64 = torch.float64
SMALL_UNET = small_unet_config()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


LAYERS = {  # name: (function of (x, weight, bias), x, weight, bias)
    "linear": (F.linear, _randn(6, 5, seed=1), _randn(4, 5, seed=2), _randn(4, seed=3)),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2), _randn(3, 4, 7, 7, seed=1), _randn(6, 2, 3, 3, seed=2),
               _randn(6, seed=3)),
    "conv2d 1x1": (lambda x, w, b: F.conv2d(x, w, b), _randn(3, 4, 5, 5, seed=1), _randn(6, 4, 1, 1, seed=2),
                   _randn(6, seed=3)),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (5, 5), w, b), _randn(3, 4, 5, 5, seed=1), _randn(5, 5, seed=2),
                   _randn(5, 5, seed=3)),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), _randn(3, 4, 5, 5, seed=1), _randn(4, seed=2),
                   _randn(4, seed=3)),
    "group_norm, channels-last": (lambda x, w, b: F.group_norm(x, 2, w, b),
                                  _randn(3, 4, 5, 5, seed=1).to(memory_format=torch.channels_last),
                                  _randn(4, seed=2), _randn(4, seed=3)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("which", ["input", "input and weights", "weights only", "bias only"])
def test_each_rule_equals_torchs_forward_mode(name, which):
    fn, x, w, b = LAYERS[name]
    tangents = [_randn(*a.shape, seed=10 + i) for i, a in enumerate((x, w, b))]
    keep = {"input": [0], "input and weights": [0, 1, 2], "weights only": [1, 2], "bias only": [2]}[which]
    tangents = [tangent if i in keep else None for i, tangent in enumerate(tangents)]
    given = [i for i, tangent in enumerate(tangents) if tangent is not None]

    def of_given(*values):  # fn as a function of the inputs that have a tangent
        args = [x.contiguous(), w, b]  # torch's forward-mode GroupNorm fails on channels-last input
        for i, value in zip(given, values):
            args[i] = value
        return fn(*args)
    reference = torch.func.jvp(of_given, tuple((x.contiguous(), w, b)[i] for i in given),
                               tuple(tangents[i] for i in given))[1]
    lean = jvp.jvp(fn, (x, w, b), tuple(tangents))
    torch.testing.assert_close(lean, reference, rtol=1e-10, atol=1e-10)
    assert lean.shape == reference.shape and reference.abs().mean() > 0.1  # not vacuous


def _times(n):
    t = torch.rand(n, generator=gen(3), dtype=F64) * 0.8 + 0.1
    return t, t * torch.rand(n, generator=gen(4), dtype=F64)


def _unet():
    torch.manual_seed(0)
    net = nets.build((1, 8, 8), SMALL_UNET, two_times=True).double()
    for p in net.parameters():  # off the zero inits (gap embedding, output layers), so every layer counts
        torch.nn.init.normal_(p, std=0.2)
    return net


@pytest.mark.parametrize("kind", ["mlp", "unet", "unet channels-last"])
def test_total_derivative_equals_torch_func_jvp_and_central_differences(kind):
    """What MeanFlow's loss takes (compiling.total_derivative, eager): du/dt along (v, 1, 0) equals
    torch.func.jvp's, and (u(+h) - u(-h)) / 2h converges to it as h^2."""
    net = small_flow_map_net() if kind == "mlp" else _unet()
    shape = (2,) if kind == "mlp" else (1, 8, 8)
    z, v = _randn(16, *shape, seed=1), _randn(16, *shape, seed=2)
    t, r = _times(16)
    reference = torch.func.jvp(net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1]
    if kind == "unet channels-last":
        net.to(memory_format=torch.channels_last)
        z, v = z.to(memory_format=torch.channels_last), v.to(memory_format=torch.channels_last)
    dudt = compiling.total_derivative(net, z, t, r, v)
    torch.testing.assert_close(dudt, reference, rtol=1e-10, atol=1e-10)
    assert dudt.grad_fn is None and dudt.abs().mean() > 0.1  # no graph, and not vacuous
    with torch.no_grad():
        errors = [((net(z + h * v, t + h, r) - net(z - h * v, t - h, r)) / (2 * h) - dudt).abs().max().item()
                  for h in (1e-2, 1e-3, 1e-4)]
    assert all(a / b > 50 for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-5, errors


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_an_empty_batch_has_an_empty_total_derivative(kind):
    """MeanFlow takes the JVP on the r != t rows only, which a small batch can lack."""
    net, shape = (small_flow_map_net(), (2,)) if kind == "mlp" else (_unet(), (1, 8, 8))
    empty = torch.zeros(0, *shape, dtype=F64)
    assert compiling.total_derivative(net, empty, *_times(0), empty).shape == empty.shape


def test_float32_total_derivative_is_torchs_to_rounding():
    """In float32 (training) the lean rules round differently from torch's formulas, by float32 round-off."""
    net = nets.build((2,), config.NetConfig(), two_times=True)
    z, v = _randn(256, 2, seed=1).float(), _randn(256, 2, seed=2).float()
    t, r = (a.float() for a in _times(256))
    reference = torch.func.jvp(net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1]
    torch.testing.assert_close(compiling.total_derivative(net, z, t, r, v), reference, rtol=1e-5, atol=1e-5)
