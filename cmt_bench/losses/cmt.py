"""Consistency Mid-Training (Hu et al. 2025) on stored teacher ODE trajectories.

CMT-CM regresses the flow map from every trajectory point to time 0 onto the trajectory's clean
end (the consistency-model form, for ECT). CMT-MF regresses the jump between any two points of a
trajectory (the general flow-map form, for MeanFlow), in average-velocity form.
"""
import torch

from ..schema import Distance
from ..nets import flow_map
from .distance import distance


def cmt_cm_loss(net, traj: torch.Tensor, times: torch.Tensor, generator: torch.Generator, dist: Distance) -> torch.Tensor:
    """traj: [B, M+1, ...] states at `times` (decreasing, times[-1] == 0; on traj's device). One point per trajectory,
    uniform over the M non-terminal points: an unbiased estimate of the uniform average over i."""
    b, m_plus_1 = traj.shape[:2]
    i = torch.randint(0, m_plus_1 - 1, (b,), generator=generator, device=generator.device).to(traj.device)
    x_i = traj[torch.arange(b, device=traj.device), i]
    pred = flow_map(net, x_i, times[i].to(traj.dtype), torch.zeros(b, dtype=traj.dtype, device=traj.device))
    return distance(pred, traj[:, -1], dist).mean()


def cmt_mf_loss(net, traj: torch.Tensor, times: torch.Tensor, generator: torch.Generator, dist: Distance) -> torch.Tensor:
    """One pair i < j (t_i > t_j) per trajectory, uniform over all M(M+1)/2 pairs: regress
    u(x_i, t_j, t_i) onto the teacher's average velocity (x_i - x_j) / (t_i - t_j)."""
    b, m_plus_1 = traj.shape[:2]
    pairs = torch.triu_indices(m_plus_1, m_plus_1, offset=1)  # all (i, j) with i < j
    pick = pairs[:, torch.randint(0, pairs.shape[1], (b,), generator=generator, device=generator.device)].to(traj.device)
    rows = torch.arange(b, device=traj.device)
    x_i, x_j = traj[rows, pick[0]], traj[rows, pick[1]]
    t_i, t_j = times[pick[0]].to(traj.dtype), times[pick[1]].to(traj.dtype)
    gap = (t_i - t_j).reshape(-1, *([1] * (traj.ndim - 2)))
    return distance(net(x_i, t_i, t_j), (x_i - x_j) / gap, dist).mean()
