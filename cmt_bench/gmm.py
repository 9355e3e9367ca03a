"""A Gaussian mixture in d dimensions: data whose flow map is known, so a model is scored against the
truth instead of a finite held-out set.

Under the linear path x_t = (1 - t) x_0 + t eps, component k (mean m_k, std s_k) gives
x_t | k ~ N((1 - t) m_k, sd_k(t)^2 I) with sd_k(t)^2 = (1 - t)^2 s_k^2 + t^2, whose velocity is
`paths.GaussianFlow`'s. The marginal velocity is their average under the posterior P(k | x_t), so
it is closed form (the tests check it against GaussianFlow for one component); the exact flow map X*(x, t, r) is a float64 solve of its ODE (DOP853) to a
stated tolerance. `flowmap_err` is how far a model's samples land from the exact map's at the same
noise (zero for the exact map), `mode_coverage` / `mode_precision` say which modes a sample reaches.
"""
from __future__ import annotations

import math

import numpy as np
import torch

TOLERANCE = 1e-10  # relative and absolute tolerance of the exact map's ODE solve


class GaussianMixture:
    """Equal-weight isotropic components: means [K, d], stds [K] (float64)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if self.stds.numel() != len(self.means) or (self.stds <= 0).any():
            raise ValueError(f"one positive std per component: {len(self.means)} means, stds {self.stds.tolist()}")

    @classmethod
    def from_config(cls, cfg) -> "GaussianMixture":
        """Means drawn N(0, spread^2 I) at cfg.seed (the mixture is part of the dataset's definition,
        apart from the seed that draws its samples); `scale` is every component's std, or one each."""
        gen = torch.Generator().manual_seed(cfg.seed)
        means = cfg.spread * torch.randn(cfg.components, cfg.dim, generator=gen, dtype=torch.float64)
        scales = cfg.scale if isinstance(cfg.scale, list) else [cfg.scale] * cfg.components
        return cls(means, torch.tensor(scales, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n points (float32 [n, d]) and their components (int64 [n])."""
        k = rng.integers(0, len(self.means), n)
        x = self.means.numpy()[k] + self.stds.numpy()[k, None] * rng.standard_normal((n, self.dim))
        return x.astype(np.float32), k.astype(np.int64)

    def _variances(self, t: torch.Tensor) -> torch.Tensor:
        """sd_k(t)^2 = (1 - t)^2 s_k^2 + t^2 for a column of times t, [B or 1, K]."""
        return (1 - t) ** 2 * self.stds**2 + t**2

    def _log_joint(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log N(x; (1 - t) m_k, sd_k(t)^2 I) for every component, [B, K] (equal weights dropped)."""
        var = self._variances(t)
        d2 = (x**2).sum(1, keepdim=True) - 2 * (1 - t) * (x @ self.means.T) + (1 - t) ** 2 * (self.means**2).sum(1)
        return -0.5 * d2.clamp_min(0) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_density(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """log p_t(x), [B]."""
        x, t = _as64(x, t)
        return torch.logsumexp(self._log_joint(x, t), 1) - math.log(len(self.means))

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """E[eps - x_0 | x_t = x]: each component's velocity (GaussianFlow's, -m_k + a_k (x - (1 - t) m_k)
        with a_k = sd_k'/sd_k) weighted by its posterior, in matrix form, [B, d]."""
        x, t = _as64(x, t)
        post = torch.softmax(self._log_joint(x, t), 1)  # [B, K]
        pa = post * ((t - (1 - t) * self.stds**2) / self._variances(t))
        return -post @ self.means + pa.sum(1, keepdim=True) * x - (1 - t) * (pa @ self.means)

    def flow_map(self, x: torch.Tensor, t: float, r: float, tol: float = TOLERANCE) -> torch.Tensor:
        """X*(x, t, r): the ODE dx/dt = v(x, t) solved from t to r in float64 (DOP853, rtol = atol = tol)."""
        from scipy.integrate import solve_ivp
        x0 = torch.as_tensor(x, dtype=torch.float64)
        shape = x0.shape

        def rhs(time, flat):
            return self.velocity(torch.from_numpy(flat).reshape(shape), time).reshape(-1).numpy()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # [B, d] x [d, K] products are too small to split: 2 threads took 3x longer
        try:
            sol = solve_ivp(rhs, (float(t), float(r)), x0.reshape(-1).numpy(), method="DOP853", rtol=tol, atol=tol)
        finally:
            torch.set_num_threads(threads)
        if not sol.success:
            raise RuntimeError(f"exact flow map: the ODE solve from t={t} to {r} failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)

    def components(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each point of the data (t = 0), [B]."""
        x, t = _as64(x, 0.0)
        return self._log_joint(x, t).argmax(1)

    def within(self, x: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
        """Whether each point lies inside the `quantile` ball of its nearest component, [B] bool."""
        from scipy.stats import chi2
        x = torch.as_tensor(x, dtype=torch.float64)
        k = self.components(x)
        d2 = ((x - self.means[k]) ** 2).sum(1) / self.stds[k] ** 2
        return d2 <= float(chi2.ppf(quantile, self.dim))


def _as64(x, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in float64 and their times as a column ([B, 1], or [1, 1] for one time)."""
    return torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)


def flowmap_err(samples, exact) -> float:
    """Mean Euclidean distance between a model's samples and the exact map's from the same noise."""
    diff = torch.as_tensor(samples, dtype=torch.float64) - torch.as_tensor(exact, dtype=torch.float64)
    return float(diff.flatten(1).norm(dim=1).mean())


def mode_scores(mixture: GaussianMixture, samples, min_share: float = 0.2) -> dict[str, float]:
    """mode_precision: the share of samples inside their nearest mode's 99.9% ball; mode_coverage:
    the share of modes that hold at least `min_share` of the samples an even split would give them."""
    x = torch.as_tensor(samples, dtype=torch.float64)
    inside = mixture.within(x)
    counts = torch.bincount(mixture.components(x)[inside], minlength=len(mixture.means)).double()
    even = len(x) / len(mixture.means)
    return {"mode_precision": float(inside.double().mean()),
            "mode_coverage": float((counts >= min_share * even).double().mean())}
