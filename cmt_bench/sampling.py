"""Few-step samplers of a flow-map model, at fixed seeds."""
from __future__ import annotations

import torch

from .nets import flow_map
from .paths import noise


@torch.no_grad()
def one_step(net, eps: torch.Tensor) -> torch.Tensor:
    return flow_map(net, eps, 1.0, 0.0)


@torch.no_grad()
def two_step(net, path, eps: torch.Tensor, eps_mid: torch.Tensor, t_mid: float, kind: str = "renoise") -> torch.Tensor:
    """A 2-step sample, as a method's paper draws it (its registry entry's `two_step`):
    renoise: jump to the data, re-noise to t_mid with fresh noise, jump again (consistency models);
    chain: jump from 1 to t_mid, then from t_mid to the data (MeanFlow); eps_mid is not used."""
    t = torch.full((eps.shape[0],), t_mid, dtype=eps.dtype, device=eps.device)
    if kind == "chain":
        return flow_map(net, flow_map(net, eps, 1.0, t), t, 0.0)
    if kind != "renoise":
        raise ValueError(f"two_step kind {kind!r}: allowed {', '.join(TWO_STEP)}")
    x0 = one_step(net, eps)
    return flow_map(net, path.sample(x0, eps_mid, t), t, 0.0)


TWO_STEP = ("renoise", "chain")


@torch.no_grad()
def sample(net, path, n: int, shape: tuple[int, ...], seed: int, t_mid: float, two_step_kind: str = "renoise",
           batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """1- and 2-step samples (on the CPU) from noise drawn on the CPU at `seed`, run on net's device."""
    device = next(net.parameters(), torch.empty(0)).device
    eps, eps_mid = noise(n, shape, seed)
    out = {"1step": [], "2step": []}
    for i in range(0, n, batch_size):
        e, m = eps[i:i + batch_size].to(device), eps_mid[i:i + batch_size].to(device)
        out["1step"].append(one_step(net, e).cpu())
        out["2step"].append(two_step(net, path, e, m, t_mid, two_step_kind).cpu())
    return {k: torch.cat(v) for k, v in out.items()}
