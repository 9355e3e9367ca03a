"""Optuna samplers whose trial n gets a point that depends on n and the seed only.

Optuna's QMCSampler counts its draws in the study's storage, a read and a write that two workers can
interleave (two trials get one point, or trial n another's), and it draws the first trial at random
before it knows the space; a seeded RandomSampler per worker draws a set of points that depends on
which worker ran which trial. Here the space is known up front (the spec's), so trial n's point is
a pure function of (kind, seed, n): the same study for any number of workers, in any order.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from scipy.stats import qmc


def unit_point(kind: str, seed: int, number: int, dims: int) -> np.ndarray:
    """Trial `number`'s point in [0, 1)^dims: scrambled Sobol point `number` (qmc), or a uniform draw
    from a generator seeded by (seed, number) (random)."""
    if kind == "qmc":
        engine = qmc.Sobol(dims, scramble=True, seed=seed)
        if number:  # scipy refuses to skip zero points
            engine.fast_forward(number)
        with warnings.catch_warnings():  # "balance properties need 2^k points": one point at a time is the design
            warnings.simplefilter("ignore", UserWarning)
            return engine.random(1)[0]
    if kind == "random":
        return np.random.default_rng([seed, number]).random(dims)
    raise ValueError(f"sampler kind: {kind!r} is not one of qmc, random")


def from_unit(u: float, dist: BaseDistribution) -> Any:
    """The value of `dist` at quantile-like position u in [0, 1): uniform in the value (or its log),
    integers and choices as equal-width cells."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    if not isinstance(dist, (FloatDistribution, IntDistribution)) or dist.step not in (None, 1):
        raise ValueError(f"unsupported distribution {dist}")
    whole = isinstance(dist, IntDistribution)
    low, high = (dist.low - 0.5, dist.high + 0.5) if whole else (dist.low, dist.high)
    if dist.log:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    if whole:
        value = int(round(value))
    return min(max(value, dist.low), dist.high)


class TrialPointSampler(optuna.samplers.BaseSampler):
    """Every parameter of `space` from trial.number's point; a trial enqueued with fixed parameters
    (a retry) keeps them, as with any Optuna sampler."""

    def __init__(self, kind: str, seed: int, space: dict[str, BaseDistribution]) -> None:
        unit_point(kind, seed, 0, 1)  # refuse an unknown kind now, not at the first trial
        self.kind, self.seed, self.space = kind, seed, dict(sorted(space.items()))

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return self.space

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        u = unit_point(self.kind, self.seed, trial.number, len(self.space))
        return {name: from_unit(x, dist) for x, (name, dist) in zip(u, self.space.items())}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        raise ValueError(f"trial {trial.number} asks for {param_name} ({param_distribution}), "
                         f"which is not in the spec's space ({', '.join(self.space)})")
