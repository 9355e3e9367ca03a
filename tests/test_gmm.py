"""The Gaussian-mixture benchmark's truth: its closed-form velocity against a single Gaussian's, the
exact density's finite differences and the continuity equation; its exact flow map against a second
solver and itself; and the metrics that score a model against it."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmt_bench import scoring
from cmt_bench.config import Params
from cmt_bench.gmm import GaussianMixture, flowmap_err, mode_scores
from cmt_bench.layout import EXACT_SAMPLES
from cmt_bench.paths import GaussianFlow, noise
from cmt_bench.solvers import integrate, time_grid

F64 = torch.float64
EYE = torch.eye(3, dtype=F64)


@pytest.fixture(scope="module")
def mixture():
    """Three well-separated modes in 3-D with different widths."""
    return GaussianMixture(torch.tensor([[2.0, 0, 0], [-1.0, 1.5, 0.5], [0.0, -2.0, 1.0]], dtype=F64),
                           torch.tensor([0.3, 0.15, 0.5], dtype=F64))


def _points(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_component_is_the_single_gaussian():
    mu = torch.tensor([0.7, -1.2], dtype=F64)
    one, exact = GaussianMixture(mu[None], torch.tensor([0.4], dtype=F64)), GaussianFlow(mu, 0.4)
    x = 1.5 * _points(64, 2)
    for t in (0.0, 0.3, 0.9, 1.0):
        assert torch.allclose(one.velocity(x, t), exact.velocity(x, torch.full((64,), t, dtype=F64)), atol=1e-12)
    assert torch.allclose(one.flow_map(x, 1.0, 0.0), exact.flow_map(x, torch.ones(64, dtype=F64), torch.zeros(64, dtype=F64)), atol=1e-8)
    assert torch.allclose(one.flow_map(x, 0.8, 0.25), exact.flow_map(x, torch.full((64,), 0.8, dtype=F64), torch.full((64,), 0.25, dtype=F64)),
                          atol=1e-8)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.85])
def test_velocity_is_the_score_identity_of_the_exact_density(mixture, t):
    """v(x, t) = -(x + t grad log p_t(x)) / (1 - t) under the linear path (Tweedie for eps), with the
    gradient by central differences of the exact log density."""
    x, h = 1.5 * _points(32), 1e-5
    grad = torch.stack([(mixture.log_density(x + h * e, t) - mixture.log_density(x - h * e, t)) / (2 * h)
                        for e in EYE], 1)
    assert torch.allclose(mixture.velocity(x, t), -(x + t * grad) / (1 - t), atol=1e-7)


@pytest.mark.parametrize("t", [0.2, 0.6])
def test_velocity_transports_the_density(mixture, t):
    """The continuity equation d/dt log p + div v + v . grad log p = 0, every term by finite differences."""
    x, h = 1.2 * _points(32), 1e-5
    dt_logp = (mixture.log_density(x, t + h) - mixture.log_density(x, t - h)) / (2 * h)
    div = sum((mixture.velocity(x + h * e, t) - mixture.velocity(x - h * e, t))[:, i] / (2 * h)
              for i, e in enumerate(torch.eye(3)))
    grad = torch.stack([(mixture.log_density(x + h * e, t) - mixture.log_density(x - h * e, t)) / (2 * h)
                        for e in EYE], 1)
    residual = dt_logp + div + (mixture.velocity(x, t) * grad).sum(1)
    assert residual.abs().max() < 1e-5 * (1 + dt_logp.abs().max())


def test_exact_map_agrees_with_heun_at_its_order(mixture):
    """Heun on a uniform grid converges to the exact map at order 2 (errors fall ~4x per halving), so
    the DOP853 solve is the more accurate of the two; composition and reversal hold to its tolerance."""
    eps = _points(200)
    exact = mixture.flow_map(eps, 1.0, 0.0)
    errors = [(integrate(mixture.velocity, eps, time_grid(n).double(), "heun")[0][-1] - exact).norm(dim=1).max().item()
              for n in (100, 200, 400)]
    assert errors[2] < 2e-4 and 3.2 < errors[0] / errors[1] < 4.8 and 3.2 < errors[1] / errors[2] < 4.8
    halfway = mixture.flow_map(mixture.flow_map(eps, 1.0, 0.5), 0.5, 0.0)
    assert torch.allclose(halfway, exact, atol=1e-8)
    assert torch.allclose(mixture.flow_map(exact, 0.0, 1.0), eps, atol=1e-7)


def test_exact_map_pushes_noise_onto_the_mixture(mixture):
    x = mixture.flow_map(_points(3000, seed=1), 1.0, 0.0)
    scores = mode_scores(mixture, x)
    assert scores["mode_coverage"] == 1.0 and scores["mode_precision"] > 0.99
    shares = torch.bincount(mixture.components(x), minlength=3).double() / len(x)
    assert (shares - 1 / 3).abs().max() < 0.04  # equal weights, within sampling error (sd ~0.009)


def test_flowmap_err_is_zero_for_the_exact_map_and_the_size_of_a_known_shift(mixture):
    exact = mixture.flow_map(_points(500, seed=2), 1.0, 0.0)
    assert flowmap_err(exact, exact) == 0.0
    directions = _points(500, seed=3)
    directions /= directions.norm(dim=1, keepdim=True)
    for delta in (1e-3, 0.1, 0.5):
        assert flowmap_err(exact + delta * directions, exact) == pytest.approx(delta, rel=1e-9)
    # a model that collapses onto one mode: every sample far from its own target, one mode covered
    collapsed = mixture.means[0].expand(500, 3)
    assert flowmap_err(collapsed, exact) > 1.0
    assert mode_scores(mixture, collapsed)["mode_coverage"] == pytest.approx(1 / 3)


def test_mixture_from_config_and_its_samples():
    cfg = SimpleNamespace(dim=4, components=6, spread=3.0, scale=0.2, seed=5)
    a, b = GaussianMixture.from_config(cfg), GaussianMixture.from_config(cfg)
    assert a.means.shape == (6, 4) and torch.equal(a.means, b.means) and (a.stds == 0.2).all()
    x, k = a.sample(6000, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.shape == (6000, 4) and set(k.tolist()) == set(range(6))
    for j in range(6):
        assert np.allclose(x[k == j].mean(0), a.means[j].numpy(), atol=0.05)
        assert np.std(x[k == j] - a.means[j].numpy()) == pytest.approx(0.2, rel=0.05)
    assert (a.components(torch.from_numpy(x)) == torch.from_numpy(k)).float().mean() > 0.99
    per = GaussianMixture.from_config(SimpleNamespace(**{**vars(cfg), "scale": [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]}))
    assert per.stds.tolist() == [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]
    with pytest.raises(ValueError, match="one positive std per component: 6 means"):
        GaussianMixture.from_config(SimpleNamespace(**{**vars(cfg), "scale": [0.1, 0.2]}))


def test_scorer_reads_the_saved_exact_samples_only_for_its_own_settings(tmp_path, monkeypatch):
    """The features stage saves the exact samples; a Scorer with the same settings reads them (here a
    planted file proves it), one with another t_mid solves the map itself: the same 1-step jump (the
    same noise), another 2-step sample."""
    monkeypatch.chdir(tmp_path)
    gmm = {"dim": 3, "components": 3, "spread": 2.0, "scale": 0.3}
    params = Params.model_validate({"data": {"dataset": "gmm", "gmm": gmm}, "evaluate": {"samples": 200}})
    scorer = scoring.Scorer(params, np.zeros((10, 3), np.float32))
    solved = scorer.exact(200)
    mixture = GaussianMixture.from_config(params.data.gmm)
    eps, _ = noise(200, (3,), params.evaluate.seed)
    assert np.allclose(solved["1step"], mixture.flow_map(eps, 1.0, 0.0).numpy(), atol=1e-9)
    scorer.save_exact(200)
    with np.load(EXACT_SAMPLES / "n200.npz") as saved:
        planted = {"key": saved["key"], **{k: np.zeros_like(saved[k]) for k in ("1step", "2step", "ode")}}
    np.savez(EXACT_SAMPLES / "n200.npz", **planted)
    assert (scoring.Scorer(params, np.zeros((10, 3), np.float32)).exact(200)["2step"] == 0).all()
    other = params.model_validate({**params.model_dump(), "sampling": {**params.sampling.model_dump(), "t_mid": 0.3}})
    moved = scoring.Scorer(other, np.zeros((10, 3), np.float32)).exact(200)
    assert np.array_equal(moved["1step"], solved["1step"]) and not np.allclose(moved["2step"], solved["2step"])
    scores = scorer({"1step": solved["1step"].astype(np.float32), "floor": solved["2step"]})
    assert scores["flowmap_err_1step_n200"] < 1e-6 and "flowmap_err_floor_n200" not in scores  # no noise: no target
    assert scores["mode_coverage_floor_n200"] == 1.0
    # a chain's 2-step samples are scored against the exact 1-step jump (the exact map composes)
    chain = dataclasses.replace(scorer, two_step="chain")({"2step": solved["1step"].astype(np.float32)})
    renoised = scorer({"2step": solved["1step"].astype(np.float32)})
    assert chain["flowmap_err_2step_n200"] < 1e-6 < renoised["flowmap_err_2step_n200"]
