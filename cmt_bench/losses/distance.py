import torch

from ..schema import Distance


def distance(a: torch.Tensor, b: torch.Tensor, cfg: Distance) -> torch.Tensor:
    """Per-sample distance between a and b [B, ...]: mean squared error (l2), pseudo-Huber
    sqrt(|a - b|^2 + c^2) - c (Song & Dhariwal 2023), which is less swayed by outliers, or LPIPS on
    VGG16 features of images (losses/lpips.py, from local weights files)."""
    if cfg.kind == "lpips":
        from .lpips import load
        return load(cfg.vgg_weights, cfg.lpips_weights, str(a.device))(a, b)
    sq = (a - b).flatten(1).pow(2)
    if cfg.kind == "l2":
        return sq.mean(1)
    return torch.sqrt(sq.sum(1) + cfg.huber_c**2) - cfg.huber_c
