"""compute.compile: how much of a training step torch.compile takes over.

- none: eager PyTorch.
- step: the network as the loss calls it: its forward and, through AOTAutograd, its backward run
  as compiled kernels. A forward-mode JVP still runs eagerly on the bare module (jvp.py's lean rules).
- jvp: step, and the JVP of the MeanFlow-style losses (losses/average_velocity.py) compiled too.
  On a GPU that JVP is bound by the CPU (reports/gpu/README.md: about 190 ms of dispatcher work per
  fashion-UNet step), which is what a compiled graph removes.

Two limits of torch 2.13 shape the compiled JVP:
- Dynamo cannot trace forward-mode AD through the native layer / group norm kernels (an internal
  assert in _fw_primal; pytorch/pytorch#197090, #139756), so inside the compiled JVP the norms are
  written out as mean and variance arithmetic: the same function, rounded differently;
- torch.func.jvp fixes the batch size of its graph, so the batch is padded with zero rows up to one
  of a few sizes (multiples of a quarter of the power of two below it, at most 25% extra) instead
  of being compiled anew for every count of r != t samples.
"""
from __future__ import annotations

from functools import partial
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import jvp
from .distributed import unwrap
from .schema import CompileMode

MODES = get_args(CompileMode)


class StepModel(nn.Module):
    """The network as a compiled training step sees it: `inner` (the bare or DDP-wrapped network)
    compiled, and under `jvp` a compiled total derivative that `total_derivative` picks up."""

    def __init__(self, inner: nn.Module, mode: str):
        super().__init__()
        self.inner = torch.compile(inner)
        self.jvp = torch.compile(partial(_jvp_with_plain_norms, unwrap(inner)), dynamic=False) if mode == "jvp" else None

    def forward(self, *args):
        return self.inner(*args)


def for_step(model: nn.Module, mode: str) -> nn.Module:
    """What the loss calls under compute.compile `mode`: `model` (bare or DDP-wrapped) itself when none."""
    if mode not in MODES:
        raise ValueError(f"compute.compile: {mode!r}; allowed: {', '.join(MODES)}")
    return model if mode == "none" else StepModel(model, mode)


def _jvp(net: nn.Module, z, t, r, v) -> torch.Tensor:
    return torch.func.jvp(net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1]


def total_derivative(net: nn.Module, z, t, r, v) -> torch.Tensor:
    """du/dt of u(z, r, t) = net(z, t, r) along (dz, dt, dr) = (v, 1, 0), by one forward-mode JVP of
    the bare network (a JVP needs no DDP: it builds no graph); compiled when `net` (what the loss
    was given) is a StepModel under compile mode jvp."""
    compiled = net.jvp if isinstance(net, StepModel) else None
    if compiled is None:  # eager: dual tensors with the lean rules of jvp.py (half torch.func.jvp's time)
        return jvp.jvp(unwrap(net), (z, t, r), (v, torch.ones_like(t), None))
    n = z.shape[0]
    m = padded_size(n)
    pad = (lambda a: torch.cat([a, a.new_zeros(m - n, *a.shape[1:])])) if m > n else (lambda a: a)
    return compiled(pad(z), pad(t), pad(r), pad(v))[:n]


def padded_size(n: int) -> int:
    """n rounded up to a multiple of a quarter of the largest power of two <= n: 4 sizes per octave."""
    quarter = max(1, 1 << (n.bit_length() - 3)) if n > 4 else 1
    return -(-n // quarter) * quarter


def _layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    h = x.reshape(x.shape[0], groups, -1)
    mean = h.mean(-1, keepdim=True)
    y = ((h - mean) * torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    per_channel = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    y = y if weight is None else y * weight.reshape(per_channel)
    return y if bias is None else y + bias.reshape(per_channel)


class PlainNorms(TorchFunctionMode):
    """F.layer_norm and F.group_norm as elementary ops, which Dynamo can differentiate forward."""
    PLAIN = {F.layer_norm: _layer_norm, F.group_norm: _group_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.PLAIN.get(func, func)(*args, **(kwargs or {}))


@torch.no_grad()
def _jvp_with_plain_norms(net: nn.Module, z, t, r, v) -> torch.Tensor:
    with PlainNorms():
        return _jvp(net, z, t, r, v)
