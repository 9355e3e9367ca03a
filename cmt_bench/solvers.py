"""Probability-flow ODE solvers and time grids, from t = 1 (noise) down to t = 0 (data)."""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, kind: str = "uniform", rho: float = 7.0, t_min: float = 0.0) -> torch.Tensor:
    """steps + 1 decreasing times from 1 to 0. `edm` spaces them like Karras et al.'s rho schedule
    (dense near the data end): t_i = (1 + i/steps (t_min^(1/rho) - 1))^rho."""
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "uniform":
        grid = 1 - i
    elif kind == "edm":
        grid = (1 + i * (t_min ** (1 / rho) - 1)) ** rho
    else:
        raise ValueError(f"unknown grid {kind!r}; allowed: uniform, edm")
    grid[-1] = 0.0
    return grid


def euler_step(v: Velocity, x, t, t_next):
    return x + (t_next - t) * v(x, t), 1


def heun_step(v: Velocity, x, t, t_next):
    d = v(x, t)
    x_euler = x + (t_next - t) * d
    return x + (t_next - t) * 0.5 * (d + v(x_euler, t_next)), 2


SOLVERS = {"euler": euler_step, "heun": heun_step}


@torch.no_grad()
def integrate(v: Velocity, x1: torch.Tensor, grid: torch.Tensor, solver: str = "heun") -> tuple[torch.Tensor, int]:
    """Solve dx/dt = v(x, t) along `grid`; return all states [len(grid), B, ...] and the number of
    velocity evaluations per sample (NFE)."""
    step = SOLVERS[solver]
    states, nfe, x = [x1], 0, x1
    grid = grid.to(x1.dtype)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x, n = step(v, x, t, t_next)
        states.append(x)
        nfe += n
    return torch.stack(states), nfe
