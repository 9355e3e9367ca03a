"""Consistency Mid-Training, CMT-CM variant (Hu et al. 2025): on stored teacher ODE trajectories,
regress the flow map from every trajectory point to time 0 onto the trajectory's clean end."""
import torch

from ..config import Distance
from ..nets import flow_map
from .distance import distance


def cmt_cm_loss(net, traj: torch.Tensor, times: torch.Tensor, generator: torch.Generator, dist: Distance) -> torch.Tensor:
    """traj: [B, M+1, ...] states at `times` (decreasing, times[-1] == 0). One point per trajectory,
    uniform over the M non-terminal points: an unbiased estimate of the uniform average over i."""
    b, m_plus_1 = traj.shape[:2]
    i = torch.randint(0, m_plus_1 - 1, (b,), generator=generator)
    x_i = traj[torch.arange(b), i]
    pred = flow_map(net, x_i, times[i].to(traj.dtype), torch.zeros(b, dtype=traj.dtype))
    return distance(pred - traj[:, -1], dist).mean()
