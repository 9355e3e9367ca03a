import torch

from ..schema import Distance


def distance(diff: torch.Tensor, cfg: Distance) -> torch.Tensor:
    """Per-sample distance of a residual [B, ...]: mean squared error (l2) or pseudo-Huber
    sqrt(|d|^2 + c^2) - c (Song & Dhariwal 2023), which is less swayed by outliers."""
    sq = diff.flatten(1).pow(2)
    if cfg.kind == "l2":
        return sq.mean(1)
    return torch.sqrt(sq.sum(1) + cfg.huber_c**2) - cfg.huber_c
