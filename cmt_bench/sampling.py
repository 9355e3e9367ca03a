"""Few-step samplers of a flow-map model, at fixed seeds."""
from __future__ import annotations

import torch

from .nets import flow_map
from .paths import noise


@torch.no_grad()
def one_step(net, eps: torch.Tensor) -> torch.Tensor:
    return flow_map(net, eps, 1.0, 0.0)


@torch.no_grad()
def two_step(net, path, eps: torch.Tensor, eps_mid: torch.Tensor, t_mid: float) -> torch.Tensor:
    """Jump to the data, re-noise to t_mid with fresh noise, jump again (consistency-model style)."""
    x0 = one_step(net, eps)
    t = torch.full((eps.shape[0],), t_mid, dtype=eps.dtype, device=eps.device)
    return flow_map(net, path.sample(x0, eps_mid, t), t, 0.0)


@torch.no_grad()
def sample(net, path, n: int, shape: tuple[int, ...], seed: int, t_mid: float, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """1- and 2-step samples (on the CPU) from noise drawn on the CPU at `seed`, run on net's device."""
    device = next(net.parameters(), torch.empty(0)).device
    eps, eps_mid = noise(n, shape, seed)
    out = {"1step": [], "2step": []}
    for i in range(0, n, batch_size):
        e, m = eps[i:i + batch_size].to(device), eps_mid[i:i + batch_size].to(device)
        out["1step"].append(one_step(net, e).cpu())
        out["2step"].append(two_step(net, path, e, m, t_mid).cpu())
    return {k: torch.cat(v) for k, v in out.items()}
