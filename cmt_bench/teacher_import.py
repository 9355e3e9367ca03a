"""A pre-trained teacher from a file, as the networks the stages train: its velocity on this
package's path (in place of pre-training) and the two-time flow map started from it (mid- and
post-training), through teacher_conversion's change of variables. With `pretrain.source: import` every stage
builds its network here (`network`): the pretrain stage loads the file's weights, the others the
architecture, freshly seeded, then the weights of the stage they start from (a random init keeps
the fresh ones).

Formats:
- `diffusers`: a model folder as diffusers' `save_pretrained` writes it (config.json and
  safetensors weights; pickled .bin weights are refused), loaded offline; a `UNet2DModel`'s
  `.sample` is its prediction. diffusers is the library researchers keep such models in.
- `entrypoint`: "module:function", called with the checkpoint's path, returns a torch module
  net(x, time). This runs the user's code (an EDM pickle also runs code when it loads), so it is
  refused unless `allow_code` is set.

A flow map needs a second time. `GapConditioned` adds an embedding of the gap t - s to the output of
the network's time-embedding module (diffusers' `time_embedding` by default; another name for
other networks), its last layer zero-initialised, so at the start u(x, s, t) is the teacher's
velocity for every s, as for the package's own networks (nets.TimeConditioning).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .nets import FourierTime
from .schema import TEACHER_FORMATS
from .teacher_conversion import SCHEDULES, ForeignVelocity

FORMATS = TEACHER_FORMATS


class DiffusersNet(nn.Module):
    """A diffusers UNet2DModel as net(x, time) -> its prediction."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.unet(x, time).sample


def load_network(path: str | Path, fmt: str, allow_code: bool = False, weights: bool = True) -> nn.Module:
    """The teacher at `path` as net(x, time) in its own convention; bad input refused by name.
    `weights=False`: the same architecture with fresh weights from torch's seeded generator."""
    if fmt == "diffusers":
        return DiffusersNet(_diffusers_unet(Path(path), weights))
    if fmt == "entrypoint":
        net = _from_entrypoint(str(path), allow_code)
        return net if weights else _reinitialised(net, str(path))
    raise ValueError(f"teacher format: {fmt!r}; allowed: {', '.join(FORMATS)}")


def _reinitialised(net: nn.Module, spec: str) -> nn.Module:
    """`net` with every parameter drawn afresh by its module's reset_parameters(); a parameter no
    such module owns is refused rather than left pre-trained (a random init must be random)."""
    covered = set()
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            covered.update(id(p) for p in module.parameters(recurse=False))
    left = [name for name, p in net.named_parameters() if id(p) not in covered]
    if left:
        raise ValueError(f"teacher entry point {spec!r}: parameters {', '.join(left[:5])} belong to modules without "
                         f"reset_parameters(), so a random init cannot redraw them; give those modules one")
    return net


def _diffusers_unet(folder: Path, weights: bool = True) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"teacher path {folder}: no diffusers model folder there (config.json missing); "
                                f"write one with UNet2DModel.save_pretrained(folder)")
    from diffusers import UNet2DModel  # only where a diffusers teacher is used
    if not weights:  # the architecture alone (a random init, a plan): config.json suffices
        return UNet2DModel.from_config(UNet2DModel.load_config(folder, local_files_only=True))
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"teacher path {folder}: no safetensors weights (pickled weights run code; convert them "
                         f"with UNet2DModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True))")
    # low_cpu_mem_usage would need accelerate; the teacher is loaded once
    return UNet2DModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)


def _from_entrypoint(spec: str, allow_code: bool) -> nn.Module:
    """spec is "module:function" or "module:function@checkpoint path"."""
    if not allow_code:
        raise PermissionError(f"teacher entry point {spec!r} runs your code (and a pickle it loads runs code too): "
                              f"set allow_code (pretrain.teacher.allow_code: true) to allow it")
    target, _, checkpoint = spec.partition("@")
    module_name, _, function = target.partition(":")
    if not module_name or not function:
        raise ValueError(f"teacher entry point {spec!r}: expected 'module:function' or 'module:function@path'")
    net = getattr(importlib.import_module(module_name), function)(*([checkpoint] if checkpoint else []))
    if not isinstance(net, nn.Module):
        raise TypeError(f"teacher entry point {spec!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


class GapConditioned(nn.Module):
    """net(x, time, gap): `net` with an embedding of the gap added to the output of its submodule
    `embedding` (whose width its last Linear layer gives). `net` takes one time, so the gap reaches
    the forward hook through this module, for the length of one call. With two_times=False it is
    `net` itself (the teacher), under the same parameter names, as nets.TimeConditioning does it."""

    def __init__(self, net: nn.Module, embedding: str = "unet.time_embedding", features: int = 64,
                 max_freq: float = 100.0, two_times: bool = True):
        super().__init__()
        self.net = net
        if not two_times:
            self._gap = None
            return
        try:
            target = net.get_submodule(embedding)
        except AttributeError:
            names = [n for n, _ in net.named_modules() if "emb" in n.split(".")[-1]][:8]
            raise ValueError(f"time embedding module {embedding!r} not found in the teacher; "
                             f"candidates: {', '.join(names) or 'none named *emb*'}") from None
        width = [m for m in target.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.emb_gap = FourierTime(features, width, max_freq)  # the name nets.load_teacher_into expects missing
        nn.init.zeros_(self.emb_gap.mlp[-1].weight)
        nn.init.zeros_(self.emb_gap.mlp[-1].bias)
        self._gap = None
        target.register_forward_hook(self._add_gap)

    def _add_gap(self, module, inputs, output):
        # called outside forward (the bare teacher used on its own), the network is the teacher
        return output if self._gap is None else output + self.emb_gap(self._gap).to(output.dtype)

    def forward(self, x: torch.Tensor, time: torch.Tensor, gap: torch.Tensor | None = None) -> torch.Tensor:
        # no gap is gap 0, as in nets.TimeConditioning: net(x, t) = net(x, t, t)
        self._gap = gap if gap is not None else x.new_zeros(x.shape[0])
        try:
            return self.net(x, time)
        finally:
            self._gap = None


def flow_map_network(net: nn.Module, schedule, prediction: str, embedding: str = "unet.time_embedding",
                     two_times: bool = True) -> nn.Module:
    """The two-time flow-map network u(x, s, t), called net(x, t, s) as the stages call theirs (with
    two_times=False the teacher's velocity v(x, t), under the same parameter names). MeanFlow-style
    methods train it through a forward-mode JVP, so diffusers attention in it gets a processor
    forward-mode AD can run through (`_forward_ad_attention`)."""
    _forward_ad_attention(net)
    return ForeignVelocity(GapConditioned(net, embedding, two_times=two_times), schedule, prediction)


def network(cfg, shape: tuple[int, ...], two_times: bool, weights: bool = False) -> nn.Module:
    """The network every stage trains or samples when the teacher is imported (cfg: the
    pretrain.teacher section): the file's architecture on this package's path, with the file's
    weights (`weights`) or fresh seeded ones. Data of another shape than the teacher's are refused."""
    net = load_network(cfg.path, cfg.format, cfg.allow_code, weights)
    _check_shape(net, shape, cfg.path)
    schedule = SCHEDULES[cfg.schedule](**cfg.schedule_args)
    return flow_map_network(net, schedule, cfg.prediction, cfg.time_embedding, two_times)


def _check_shape(net: nn.Module, shape: tuple[int, ...], path: str) -> None:
    config = getattr(getattr(net, "unet", None), "config", None)  # what a diffusers model declares
    if config is None:
        return  # an entry point's module: its first forward says
    size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else [config.sample_size] * 2
    if len(shape) != 3 or (config.in_channels, *size) != tuple(shape) or config.out_channels != shape[0]:
        raise ValueError(f"pretrain.teacher.path {path}: the teacher takes {config.in_channels}x{size[0]}x{size[1]} "
                         f"images and predicts {config.out_channels} channels; the data are {'x'.join(map(str, shape))}")


def _forward_ad_attention(net: nn.Module) -> None:
    """Give every diffusers Attention in `net` the classic (matmul) processor with a contiguous output.
    The default one (scaled_dot_product_attention) has no forward-mode AD on a CPU, and the classic
    one returns a non-contiguous tangent on which the next GroupNorm's forward AD fails (measured
    with diffusers 0.42.1 and torch 2.13); the same arithmetic, so the outputs agree to rounding."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    class ContiguousAttnProcessor(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                    *args, **kwargs).contiguous()

    for module in net.modules():
        if isinstance(module, Attention):
            module.set_processor(ContiguousAttnProcessor())
