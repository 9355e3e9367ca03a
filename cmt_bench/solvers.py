"""Probability-flow ODE solvers and time grids, from t = 1 (noise) down to t = 0 (data)."""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# EDM's noise range; on the linear path sigma = t / (1 - t), so t = sigma / (1 + sigma)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def time_grid(steps: int, kind: str = "uniform", rho: float = 7.0, t_min: float = 0.0) -> torch.Tensor:
    """steps + 1 decreasing times from 1 to 0. `edm` spaces them like Karras et al.'s rho schedule
    (dense near the data end): t_i = (1 + i/steps (t_min^(1/rho) - 1))^rho. `logsnr` spaces them
    uniformly in log-SNR (as DPM-Solver's reference code) over EDM's sigma range, with the ends
    moved to exactly 1 and 0."""
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "uniform":
        grid = 1 - i
    elif kind == "edm":
        grid = (1 + i * (t_min ** (1 / rho) - 1)) ** rho
    elif kind == "logsnr":
        sigma = SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** i
        grid = sigma / (1 + sigma)
        grid[0] = 1.0
    else:
        raise ValueError(f"unknown grid {kind!r}; allowed: uniform, edm, logsnr")
    grid[-1] = 0.0
    return grid


def euler_step(v: Velocity, x, t, t_next):
    return x + (t_next - t) * v(x, t), 1


def heun_step(v: Velocity, x, t, t_next):
    d = v(x, t)
    x_euler = x + (t_next - t) * d
    return x + (t_next - t) * 0.5 * (d + v(x_euler, t_next)), 2


def one_step_method(step):
    """A whole-grid solver from a one-step method (x, t, t_next) -> (x_next, evaluations)."""
    def solve(v: Velocity, x1: torch.Tensor, grid: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        states, nfe, x = [x1], 0, x1
        for t, t_next in zip(grid[:-1], grid[1:]):
            x, n = step(v, x, t, t_next)
            states.append(x)
            nfe += n
        return states, nfe
    return solve


def _log_snr(t: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) of the linear path: -inf at t = 1, +inf at t = 0."""
    return torch.log1p(-t) - torch.log(t)


def dpm_solver_pp(order: int):
    """DPM-Solver++(2M) or (3M) (Lu et al. 2022): multistep in data prediction x0 = x - t v(x, t),
    exact in the path's linear part, with finite differences of earlier x0 in log-SNR lambda.
    Earlier steps that are unbounded in lambda (the first, from t = 1) drop out of the differences
    by the formulas themselves, so the order builds up 1, 2(, 3); the last step (to t = 0) is x0."""
    def solve(v: Velocity, x1: torch.Tensor, grid: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        states, x, earlier = [x1], x1, []  # earlier: (lambda, x0) of past steps, newest last
        for t, t_next in zip(grid[:-1], grid[1:]):
            x0, lam = x - t * v(x, t), _log_snr(t)
            if t_next == 0:
                x = x0
            else:
                h = _log_snr(t_next) - lam
                alpha, phi1 = 1 - t_next, torch.expm1(-h)
                x = (t_next / t) * x - alpha * phi1 * x0
                if earlier:
                    lam1, x0_1 = earlier[-1]
                    r0 = (lam - lam1) / h
                    d1_0 = (x0 - x0_1) / r0
                    if order == 3 and len(earlier) > 1:
                        lam2, x0_2 = earlier[-2]
                        r1 = (lam1 - lam2) / h
                        d1_1 = (x0_1 - x0_2) / r1
                        d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
                        phi2 = phi1 / h + 1
                        x = x + alpha * phi2 * d1 - alpha * (phi2 / h - 0.5) * d2
                    else:
                        x = x - 0.5 * alpha * phi1 * d1_0
            earlier = (earlier + [(lam, x0)])[-2:]
            states.append(x)
        return states, len(grid) - 1
    return solve


# every solver maps (v, x1, grid) to (all states, evaluations per sample)
SOLVERS = {"euler": one_step_method(euler_step), "heun": one_step_method(heun_step),
           "dpm_solver_pp_2m": dpm_solver_pp(2), "dpm_solver_pp_3m": dpm_solver_pp(3)}


@torch.no_grad()
def integrate(v: Velocity, x1: torch.Tensor, grid: torch.Tensor, solver: str = "heun") -> tuple[torch.Tensor, int]:
    """Solve dx/dt = v(x, t) along `grid`; return all states [len(grid), B, ...] and the number of
    velocity evaluations per sample (NFE)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    states, nfe = SOLVERS[solver](v, x1, grid.to(device=x1.device, dtype=x1.dtype))
    return torch.stack(states), nfe


def trajectories(v: Velocity, x1: torch.Tensor, grid: torch.Tensor, solver: str = "heun") -> tuple[torch.Tensor, int]:
    """Whole trajectories from noise x1, one per sample: [B, len(grid), ...] (as the trajectories stage
    stores them and mid-training reads them), and the NFE per trajectory."""
    states, nfe = integrate(v, x1, grid, solver)
    return states.transpose(0, 1).contiguous(), nfe
