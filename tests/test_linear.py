"""cmt_bench/linear.py: which library multiplies each product, and that the layer is F.linear's function
either way: values, both gradients, the bias's, the JVP and the counted FLOPs, for products above and
below the oneDNN threshold, batched and non-contiguous inputs; the formulas themselves in float64
(gradcheck, forward and backward); compute.matmul's routes, what auto takes, and bad values refused.
Every test runs on the oneDNN route (whatever auto would take on this machine) unless it says otherwise."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cmt_bench import config, jvp, linear, nets, preflight
from cmt_bench.ledger import count_flops

pytestmark = pytest.mark.skipif(linear.ONEDNN is None, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_route():
    with linear.routed("onednn"):
        yield


class _Ops(TorchDispatchMode):
    """The names of the dispatcher ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _products(work) -> list[str]:
    with _Ops() as ops:
        work()
    return [n for n in ops.names if n.split(".")[-1] in ("_linear_pointwise", "addmm", "mm", "linear", "matmul")]


CASES = {  # name: (input shape, out features, bias, transposed input)
    "large (oneDNN)": ((512, 128), 128, True, False),
    "small (torch)": ((512, 2), 128, True, False),
    "batched 3-D": ((4, 130, 128), 96, True, False),
    "no bias": ((512, 64), 128, False, False),
    "non-contiguous input": ((128, 512), 128, True, True),
}


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_are_f_linears(name):
    shape, out, has_bias, transposed = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x = (x.t() if transposed else x).requires_grad_()
    w = torch.randn(out, x.shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out, generator=g, requires_grad=True) if has_bias else None
    inputs = [a for a in (x, w, b) if a is not None]
    y, y_ref = linear.linear(x, w, b), F.linear(x, w, b)
    upstream = torch.randn(y_ref.shape, generator=g)
    grads, grads_ref = torch.autograd.grad(y, inputs, upstream), torch.autograd.grad(y_ref, inputs, upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for a, a_ref in zip(grads, grads_ref):  # the weight's gradient sums 512 rows: float32 round-off
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-3)
    assert y.shape == y_ref.shape and y.abs().mean() > 1 and all(a.abs().mean() > 1 for a in grads)


def test_the_large_products_run_in_onednn_forward_and_backward_and_the_small_ones_in_torch():
    g = torch.Generator().manual_seed(0)
    big_x, big_w = torch.randn(512, 128, generator=g), torch.randn(128, 128, generator=g, requires_grad=True)
    small_x, small_w = torch.randn(512, 2, generator=g), torch.randn(128, 2, generator=g, requires_grad=True)
    assert _products(lambda: linear.linear(big_x.requires_grad_(), big_w).sum().backward()) == \
        ["mkldnn._linear_pointwise"] * 3  # forward, the input's gradient, the weight's
    assert "mkldnn._linear_pointwise" not in _products(lambda: linear.linear(small_x, small_w).sum().backward())
    with linear.routed("torch"):
        assert "mkldnn._linear_pointwise" not in _products(lambda: linear.linear(big_x, big_w).sum().backward())
    assert "mkldnn._linear_pointwise" not in _products(lambda: linear.linear(big_x.double(), big_w.double().detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "mkldnn._linear_pointwise" not in _products(lambda: linear.linear(big_x, big_w.detach()))


def test_a_double_backward_differentiates_the_backward():
    """create_graph=True (benchmarks/jvp_cost.py's double VJP): the backward's products are recorded, so
    they run in F.linear, and the second derivative is nn.Linear's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g, requires_grad=True)
    w = torch.randn(128, 128, generator=g, requires_grad=True)
    v = torch.randn(512, 128, generator=g)

    def second(fn):
        (gx,) = torch.autograd.grad(torch.tanh(fn(x, w)).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v).sum(), w)[0]
    torch.testing.assert_close(second(linear.linear), second(F.linear), rtol=1e-4, atol=1e-3)
    assert second(F.linear).abs().mean() > 1


def test_formulas_pass_gradcheck_forward_and_backward():
    """float64 takes F.linear's products, so this checks _Linear's backward and JVP formulas."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 6, 5), (4, 5), (4,))]
    assert torch.autograd.gradcheck(linear.linear_rule, args)
    assert torch.autograd.gradcheck(linear.linear_rule, args, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False)


def test_jvp_through_the_onednn_route_equals_torchs_nn_linear():
    """The toy network's JVP in float32, routed, against the same weights in plain nn.Linear layers
    under torch.func.jvp: equal to float32 round-off."""
    torch.manual_seed(0)
    routed = nets.build((2,), nets.NetConfig(), two_times=True)
    for p in routed.parameters():  # off the zero inits, so every layer counts
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g)
    t = torch.rand(512, generator=g)
    r = t * torch.rand(512, generator=g)
    tangents = (v, torch.ones_like(t), None)
    assert "mkldnn._linear_pointwise" in _products(lambda: jvp.jvp(routed, (z, t, r), tangents))
    lean = jvp.jvp(routed, (z, t, r), tangents)
    with linear.routed("torch"):
        reference = torch.func.jvp(routed, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1]
    torch.testing.assert_close(lean, reference, rtol=1e-4, atol=1e-5)
    assert lean.abs().mean() > 0.1


def test_flops_are_counted_alike_on_either_route():
    """The ledger's FLOPs (and so every verdict) do not depend on which library multiplied."""
    torch.manual_seed(0)
    net = nets.build((2,), nets.NetConfig(), two_times=True)
    x, t = torch.randn(512, 2), torch.rand(512)

    def step():
        net(x, t, t * 0.5).square().mean().backward()
    routed = count_flops(step)
    with linear.routed("torch"):
        plain = count_flops(step)
    assert routed == plain > 0


def test_the_route_is_what_compute_matmul_says_and_is_restored_after():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 128, generator=g), torch.randn(128, 128, generator=g)
    assert linear.route() == "onednn" and "mkldnn._linear_pointwise" in _products(lambda: linear.linear(x, w))
    with linear.routed("torch"):
        assert linear.route() == "torch"
        ops = _products(lambda: linear.linear(x, w))
        assert "aten.mm" in ops and "mkldnn._linear_pointwise" not in ops
        with linear.routed("auto"):
            assert linear.route() == ("onednn" if linear.onednn_pays() else "torch")
        assert linear.route() == "torch"
    assert linear.route() == "onednn"


def test_a_runs_matmul_tag_names_the_route_only_where_it_applies():
    """On another device (meta here, CUDA in a run) the products are torch's whatever the route: the tag
    says torch, not the CPU's route."""
    x, w = torch.randn(512, 128, device="meta"), torch.randn(128, 128, device="meta")
    ops = _products(lambda: linear.linear(x, w))
    assert ops and "mkldnn._linear_pointwise" not in ops
    assert linear.route_for(torch.device("meta")) == "torch" == linear.route_for(torch.device("cuda"))
    assert linear.route_for(torch.device("cpu")) == "onednn"
    with linear.routed("torch"):
        assert linear.route_for(torch.device("cpu")) == "torch"


def test_auto_takes_onednn_only_on_a_measured_processor_with_avx512(monkeypatch):
    """Zen 5 (AMD family 26) with AVX-512: oneDNN; Zen 4, Zen 2, Intel, an unknown processor or no AVX-512:
    MKL (torch). The forced routes stay what they say."""
    cases = [(("AuthenticAMD", 26), "AVX512", True), (("AuthenticAMD", 26), "AVX2", False),
             (("AuthenticAMD", 26), "DEFAULT", False), (("AuthenticAMD", 25), "AVX512", False),
             (("AuthenticAMD", 23), "AVX2", False), (("GenuineIntel", 6), "AVX512", False), (("", -1), "AVX512", False)]
    for cpu, capability, expected in cases:
        monkeypatch.setattr(linear, "processor", lambda: cpu)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert linear.onednn_pays() is expected, (cpu, capability)
        assert linear.resolve("auto") == ("onednn" if expected else "torch")
        assert linear.resolve("torch") == "torch" and linear.resolve("onednn") == "onednn"


def test_the_processor_is_read_from_proc_cpuinfo():
    """The vendor and family /proc/cpuinfo names; ("", -1) where it names none (aarch64's has no family),
    which auto treats as unmeasured."""
    vendor, family = linear.processor()
    with open("/proc/cpuinfo") as info:
        text = info.read()
    if "vendor_id" in text and "cpu family" in text:
        assert vendor and f"vendor_id\t: {vendor}" in text and f"cpu family\t: {family}" in text
    else:
        assert (vendor, family) == ("", -1)


def test_bad_routes_are_refused_naming_the_key_and_the_allowed_values(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"compute.matmul: 'blas'; allowed: auto, torch, onednn"):
        linear.use("blas")
    assert linear.route() == "onednn"  # a refused value changes nothing
    monkeypatch.setattr(linear, "ONEDNN", None)  # a torch build without oneDNN
    assert linear.resolve("auto") == "torch"
    path = tmp_path / "params.yaml"
    path.write_text("compute: {matmul: onednn}\n")
    with pytest.raises(config.ParamsError, match=r"params.yaml: compute.matmul: 'onednn', but this torch build has "
                                                  r"no oneDNN.*use auto or torch"):
        preflight.check(config.load(path), str(path))
    path.write_text("compute: {matmul: auto}\n")
    preflight.check(config.load(path), str(path))
