"""Forward-mode JVPs of a network in its inputs, with lean tangent rules for its heavy layers.

torch's forward-mode formulas differentiate every input of a layer. In a JVP in the network's inputs
the weights carry no tangent, yet a linear layer still multiplies by a zero weight tangent and adds it
(three matrix products where two do), a convolution likewise, and LayerNorm's and GroupNorm's JVP
run a decomposition op by op. Under `LeanRules` F.linear, F.conv2d, F.layer_norm and F.group_norm take
the textbook rules instead, each term only for an input that has a tangent (a weight with one still
gets its term); every other op keeps torch's formula. Measured on the toy MLP's MeanFlow JVP
(benchmarks/jvp_cost.py): about half the time of torch.func.jvp, the same derivative to float64
round-off (tests/test_jvp.py). They also work on channels-last activations, where torch's own
forward-mode GroupNorm fails. F.linear's rule is linear.py's (its products take that module's route).
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .linear import add_present as _add, full as _full, linear_rule


def jvp(fn, primals: tuple, tangents: tuple) -> torch.Tensor:
    """The tangent of fn(*primals) along `tangents` (None: no tangent), by dual tensors under LeanRules.
    It builds no graph: the rules have no backward."""
    with torch.no_grad(), fwAD.dual_level(), LeanRules():
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        return fwAD.unpack_dual(fn(*duals)).tangent


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, *geometry):
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, weight)
        ctx.geometry = geometry  # stride, padding, dilation, groups
        out = F.conv2d(x, weight, bias, *geometry)
        ctx.shape = out.shape
        return out

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight = ctx.saved_tensors
        out = None if x_t is None else F.conv2d(x_t, weight, None, *ctx.geometry)
        out = _add(out, None if weight_t is None else F.conv2d(x, weight_t, None, *ctx.geometry))
        return _full(_add(out, None if bias_t is None else bias_t[:, None, None]), ctx.shape)


def _normalized_tangent(x_t, xhat, rstd, dims):
    """The tangent of xhat = (x - mean) * rstd over `dims`: rstd * (dx - mean(dx) - xhat * mean(dx * xhat))."""
    x_t = x_t - x_t.mean(dims, keepdim=True)
    return rstd * (x_t - xhat * (x_t * xhat).mean(dims, keepdim=True))


def _affine_tangent(xhat_t, xhat, weight, weight_t, bias_t, per_channel=lambda p: p):
    out = None if xhat_t is None else xhat_t if weight is None else xhat_t * per_channel(weight)
    out = _add(out, None if weight_t is None else xhat * per_channel(weight_t))
    return _add(out, None if bias_t is None else per_channel(bias_t))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        ctx.set_materialize_grads(False)
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_forward((x - mean) * rstd, rstd, weight)
        ctx.dims, ctx.shape = tuple(range(-len(shape), 0)), out.shape
        return out

    @staticmethod
    def jvp(ctx, x_t, _shape, weight_t, bias_t, _eps):
        xhat, rstd, weight = ctx.saved_tensors
        xhat_t = None if x_t is None else _normalized_tangent(x_t, xhat, rstd, ctx.dims)
        return _full(_affine_tangent(xhat_t, xhat, weight, weight_t, bias_t), ctx.shape)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        ctx.set_materialize_grads(False)
        n, c, pixels = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, pixels, groups, eps)
        mean, rstd = mean[..., None], rstd[..., None]  # [n, groups, 1]
        ctx.save_for_forward((x.reshape(n, groups, c // groups * pixels) - mean) * rstd, rstd, weight)
        ctx.shape = x.shape
        return out

    @staticmethod
    def jvp(ctx, x_t, _groups, weight_t, bias_t, _eps):
        xhat, rstd, weight = ctx.saved_tensors
        shape = ctx.shape
        per_channel = (lambda p: p.reshape(1, shape[1], *[1] * (len(shape) - 2)))
        xhat_t = None if x_t is None else _normalized_tangent(x_t.reshape(xhat.shape), xhat, rstd, -1).reshape(shape)
        return _full(_affine_tangent(xhat_t, xhat.reshape(shape), weight, weight_t, bias_t, per_channel), shape)


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _Conv2d.apply(input, weight, bias, stride, padding, dilation, groups)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _LayerNorm.apply(input, tuple(normalized_shape), weight, bias, eps)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _GroupNorm.apply(input, num_groups, weight, bias, eps)


class LeanRules(TorchFunctionMode):
    """F.linear, F.conv2d and the two norms with the rules above; any other op unchanged."""
    RULES = {F.linear: linear_rule, F.conv2d: _conv2d, F.layer_norm: _layer_norm, F.group_norm: _group_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.RULES.get(func, func)(*args, **(kwargs or {}))
