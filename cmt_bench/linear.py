"""Linear layers whose larger float32 matrix products on the CPU may run in oneDNN instead of MKL.

torch multiplies float32 matrices on the CPU with MKL, which on AMD processors runs its AVX2 code;
oneDNN, which torch ships as well, picks its code by the instruction set alone. Which one is faster
depends on the machine (benchmarks/results/linear_cost*.json: the toy training step with fused Adam,
oneDNN's route over MKL's, paired within each rep):
- AMD EPYC Zen 5 (family 26, AVX-512): oneDNN computed the 512 x 128 x 128 product in about half MKL's
  time; steps 0.90 x (ECT), 0.96 x (flow matching), 1.05 x (MeanFlow);
- AMD EPYC Zen 4 (family 25, AVX-512 on 256-bit units): oneDNN 0.99 x on that product, steps 1.29, 1.31
  and 1.26 x;
- AMD EPYC Zen 2 (family 23, AVX2): oneDNN 0.91 x on that product, steps 1.27, 1.26 and 1.25 x;
- Intel Xeon (family 6, model 207; AVX-512): oneDNN 1.12 x on that product, steps 1.78, 1.64 and 1.38 x.
So `compute.matmul` auto (the default) takes oneDNN on the processors where it was measured faster
(ONEDNN_FASTER: Zen 5) and MKL everywhere else, unmeasured ones included; `torch` and
`onednn` force a route (the two round differently, so the route is part of a result and a stage's
MLflow run records it as its `matmul` tag). oneDNN pays some 20 us per call that MKL does not:
products below ONEDNN_MACS multiply-adds stay with MKL on either route.

`Linear` is nn.Linear with that forward (same parameters, same state dict). Its backward and its
forward-mode JVP (jvp.py's lean rule: a term only for an input that carries a tangent) take the same
route per product, so a layer's function is F.linear's rounded as the chosen library rounds it.
Everywhere else (CUDA, other dtypes, autocast, torch.compile) it is F.linear itself.
"""
from __future__ import annotations

import contextlib
import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .schema import MatmulRoute

# measured on Zen 5 (benchmarks/linear_cost.py): oneDNN ahead from 512 x 32 x 128 (2^21 multiply-adds) upwards,
# behind on 512 x 2 x 128 and 16 x 128 x 128
ONEDNN_MACS = 1 << 21

ROUTES = get_args(MatmulRoute)  # compute.matmul

try:
    ONEDNN = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):  # a build without oneDNN
    ONEDNN = None


# (vendor, family) of the processors whose toy steps oneDNN's route made faster (benchmarks/linear_cost.py):
# AMD's family 26 is Zen 5; not Zen 4 (25), Zen 2 (23) nor Intel's family 6
ONEDNN_FASTER = {("AuthenticAMD", 26)}


def processor() -> tuple[str, int]:
    """(vendor, family) of this machine's processor as /proc/cpuinfo names it; ("", -1) where unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            first = info.read().split("\n\n")[0]  # the first processor's block
        fields = {key.strip(): value.strip() for key, value in
                  (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        return fields["vendor_id"], int(fields["cpu family"])
    except (OSError, KeyError, ValueError):
        return "", -1


def onednn_pays() -> bool:
    """auto's choice: whether this is a processor where oneDNN was measured faster, with AVX-512."""
    return (ONEDNN is not None and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and processor() in ONEDNN_FASTER)


def resolve(route: str) -> str:
    """compute.matmul `route` as this machine runs it: torch or onednn."""
    if route not in ROUTES:
        raise ValueError(f"compute.matmul: {route!r}; allowed: {', '.join(ROUTES)}")
    if route == "onednn" and ONEDNN is None:
        raise ValueError("compute.matmul: 'onednn', but this torch build has no oneDNN (torch.backends.mkldnn); "
                         "use auto or torch")
    return "onednn" if route == "onednn" or (route == "auto" and onednn_pays()) else "torch"


_onednn_linear = ONEDNN if resolve("auto") == "onednn" else None  # the route in force in this process


def use(route: str) -> str:
    """Route this process's products as compute.matmul `route` says; returns the route taken."""
    global _onednn_linear
    taken = resolve(route)
    _onednn_linear = ONEDNN if taken == "onednn" else None
    return taken


def route() -> str:
    """The route in force: torch or onednn."""
    return "torch" if _onednn_linear is None else "onednn"


def route_for(device: torch.device) -> str:
    """The route a network's products take on `device` (a run's `matmul` tag): the one in force on a
    CPU; torch's own library on any other device, which the route never applies to."""
    return route() if device.type == "cpu" else "torch"


def _onednn_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's count for the oneDNN product: 2 M K N, as for aten.addmm, so the ledger
    counts the same FLOPs whichever library multiplies."""
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]


if ONEDNN is not None and torch.ops.mkldnn._linear_pointwise not in flop_registry:
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_onednn_flops)


def _onednn_may_take(*tensors) -> bool:
    """Whether the route is oneDNN and these are CPU float32 tensors outside torch.compile."""
    return (_onednn_linear is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling())


def _product(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ weight [N, K]^T (+ bias): oneDNN for a large enough CPU float32 product, else F.linear,
    which also takes a product autograd records (a backward with create_graph: oneDNN's has no derivative)."""
    macs = a.shape[0] * a.shape[1] * weight.shape[0]
    recorded = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)
    if macs >= ONEDNN_MACS and not recorded and _onednn_may_take(a, weight):
        return _onednn_linear(a, weight, bias, "none", [], "")
    return F.linear(a, weight, bias)


def add_present(total, term):
    """Sum of the terms present (None: absent); tangent rules add their terms with it."""
    return term if total is None else total if term is None else total + term


def full(tangent, shape):
    """A tangent of the output's shape (a bias's tangent alone is only its broadcastable part)."""
    return tangent if tangent.shape == shape else tangent.expand(shape).contiguous()


class _Linear(torch.autograd.Function):
    """F.linear on [..., K] inputs with every product through `_product`; its JVP is the lean rule."""

    @staticmethod
    def forward(x, weight, bias):
        return _product(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward, as torch.func's transforms need
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)  # absent gradients and tangents arrive as None
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.save_for_forward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _product(g2, weight.t()).reshape(ctx.x_shape) if need_x else None
        grad_w = _product(g2.t(), x2.t()) if need_w else None
        grad_b = g2.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x2, weight = ctx.saved_tensors
        shape = (*ctx.x_shape[:-1], weight.shape[0])
        out = None if x_t is None else _product(x_t.reshape(-1, x2.shape[1]), weight)
        out = add_present(out, None if weight_t is None else _product(x2, weight_t))
        return full(add_present(None if out is None else out.reshape(shape), bias_t), shape)


def linear_rule(input, weight, bias=None):
    """F.linear as `_Linear` on any device (what jvp.LeanRules puts in F.linear's place)."""
    return _Linear.apply(input, weight, bias)


@contextlib.contextmanager
def routed(route: str):
    """Products routed as compute.matmul `route` says inside (torch: as nn.Linear computes them)."""
    global _onednn_linear
    saved = _onednn_linear
    use(route)
    try:
        yield
    finally:
        _onednn_linear = saved


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with its CPU float32 products routed as the module docstring says."""
    if input.dim() >= 2 and not torch.is_autocast_enabled("cpu") and _onednn_may_take(input, weight):
        return _Linear.apply(input, weight, bias)
    return F.linear(input, weight, bias)


class Linear(nn.Linear):
    """nn.Linear computed by `linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)
