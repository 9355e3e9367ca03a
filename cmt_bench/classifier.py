"""A small image classifier trained on the preset's training split: the feature network of
`fd_digits` / `fd_fashion` (Frechet distance of its penultimate features; see `fidelity`).

Any preset's images go in as they are (1x8x8 digits, 1x32x32 padded Fashion-MNIST, 3x32x32
CIFAR-10): strided 3x3 convolutions with GroupNorm and SiLU, global average pooling, a
`feature_dim` penultimate layer (the features), then the logits. One file holds the weights and
the architecture's kwargs, so `load` rebuilds the network without any params.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import checkpoint, progress


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.GroupNorm(math.gcd(8, c_out), c_out), nn.SiLU())


class Classifier(nn.Module):
    """Images [N, C, H, W] in [-1, 1] -> logits [N, classes]; `features` gives the penultimate layer."""

    def __init__(self, channels: int = 1, classes: int = 10, feature_dim: int = 64,
                 widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        self.kwargs = {"channels": channels, "classes": classes, "feature_dim": feature_dim, "widths": list(widths)}
        # the first block keeps the resolution (8x8 digits are small already); each later one halves it
        blocks, c = [], channels
        for i, width in enumerate(widths):
            blocks.append(_conv_block(c, width, stride=1 if i == 0 else 2))
            c = width
        self.body = nn.Sequential(*blocks)
        self.penultimate = nn.Linear(c, feature_dim)
        self.head = nn.Linear(feature_dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.penultimate(self.body(x).mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 20, batch_size: int = 64,
                     lr: float = 3e-3, feature_dim: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                     threads: int | None = 1) -> Classifier:
    """AdamW with a one-cycle schedule on (images in [-1, 1], int labels); the same seed gives the
    same weights. Returns the network on the CPU in eval mode.

    `threads`: torch's CPU threads while training (None: as they are). One by default: these small
    convolutions gain little from two, and on a 2-core machine shared with another process two
    threads took 40 s for the digits instead of 3 s (threads wait on each other at every op)."""
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"need images [N, C, H, W] and N labels; got {tuple(images.shape)} and {tuple(labels.shape)}")
    images, labels = images.to(device), labels.long().to(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = Classifier(images.shape[1], int(labels.max()) + 1, feature_dim).to(device)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads or caller_threads)
    try:
        for _ in progress.iterate(range(epochs), "classifier", "epoch"):
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                loss = F.cross_entropy(model(images[idx.to(device)]), labels[idx.to(device)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(caller_threads)
    return model.cpu().eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    device = next(model.parameters()).device
    predicted = torch.cat([model(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])
    return float((predicted == labels.long()).float().mean())


def save(model: Classifier, path: Path) -> None:
    """Weights and the architecture's kwargs in one file (atomic write)."""
    checkpoint.save(Path(path), {"kwargs": model.kwargs, "state_dict": model.state_dict()})


def load(path: Path) -> Classifier:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"classifier weights {path} not found: train the classifier first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = dict(state["kwargs"], widths=tuple(state["kwargs"]["widths"]))
    model = Classifier(**kwargs)
    model.load_state_dict(state["state_dict"])
    return model.eval().requires_grad_(False)
