"""LPIPS (Zhang et al. 2018), the VGG16 version sony/cmt's CIFAR-10 mid-training regresses with.

Built here from two local files, never downloaded: torchvision's VGG16 state dict (keys
`features.N.weight`, e.g. vgg16-397923af.pth) and the lpips package's linear heads (keys
`linK.model.1.weight`, lpips/weights/v0.1/vgg.pth). torchvision itself is not needed (none of its
wheels loads beside this torch). The distance is the lpips package's `LPIPS(net='vgg')` on images in
[-1, 1]: scale, take relu1_2 .. relu5_3, unit-normalise each over channels, weight the squared
differences per channel, average over space, sum over the five layers.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

# torchvision's VGG16 ("D") up to relu5_3: channels of each 3x3 convolution, "M" a 2x2 max-pool
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices in torchvision's `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: the ImageNet statistics in [-1, 1] units
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 16  # relu5_3 sits behind four 2x2 pools


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features` to relu5_3, same indices (random weights)."""
    layers, channels = [], 3
    for spec in VGG16:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, spec, 3, padding=1), nn.ReLU()]
            channels = spec
    return nn.Sequential(*layers)


def save_random(folder: Path) -> tuple[str, str]:
    """Random weights in both files' layouts (for `cmt-bench plan` and tests: the cost, not the values)."""
    features = vgg16_features()
    vgg, lin = folder / "vgg16.pth", folder / "lpips_vgg.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    widths = [features[i - 1].out_channels for i in TAPS]
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(widths)}, lin)
    return str(vgg), str(lin)


class LPIPS(nn.Module):
    def __init__(self, vgg_weights: str, lpips_weights: str):
        super().__init__()
        self.features = vgg16_features()
        vgg = _load(vgg_weights, "distance.vgg_weights")
        wanted = {k for k in self.features.state_dict()}
        missing = sorted(k for k in wanted if f"features.{k}" not in vgg)
        if missing:
            raise ValueError(f"distance.vgg_weights: {vgg_weights} is not torchvision's VGG16 state dict "
                             f"(no features.{missing[0]})")
        self.features.load_state_dict({k: vgg[f"features.{k}"] for k in wanted})
        lin = _load(lpips_weights, "distance.lpips_weights")
        try:
            heads = [lin[f"lin{k}.model.1.weight"].flatten() for k in range(len(TAPS))]
        except KeyError as exc:
            raise ValueError(f"distance.lpips_weights: {lpips_weights} is not the lpips package's vgg.pth "
                             f"(no {exc.args[0]})") from None
        for k, w in enumerate(heads):
            self.register_buffer(f"head{k}", w)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS of images a, b [B, 3, H, W] in [-1, 1]."""
        if a.ndim != 4 or a.shape[1] != 3 or min(a.shape[2:]) < MIN_SIZE:
            raise ValueError(f"distance.kind: 'lpips' compares RGB images of at least {MIN_SIZE}x{MIN_SIZE} "
                             f"(got samples of shape {tuple(a.shape[1:])}); use 'l2' or 'pseudo_huber'")
        a, b = a.to(self.shift.dtype), b.to(self.shift.dtype)
        total = a.new_zeros(a.shape[0])
        for k, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            total = total + torch.einsum("bchw,c->b", (fa - fb).pow(2), getattr(self, f"head{k}")) / fa[0, 0].numel()
        return total


def _load(path: str, key: str) -> dict[str, torch.Tensor]:
    if not path or not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{key}: no file at {path!r}; LPIPS weights are never downloaded")
    return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=4)
def load(vgg_weights: str, lpips_weights: str, device: str) -> LPIPS:
    """One frozen LPIPS per files and device, shared by every loss call."""
    return LPIPS(vgg_weights, lpips_weights).to(device)
