"""A study trial's point depends on its number and the seed only: not on the worker that draws it,
the order trials are asked in, or how many workers share the study."""
import optuna
import pytest
from conftest import SHIPPED_SPECS, shipped_spec
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from scipy.stats import qmc

from cmt_bench.study import _suggest, distributions
from cmt_bench.trial_points import TrialPointSampler, from_unit, unit_point

SPACE = {"lr": FloatDistribution(1e-5, 3e-3, log=True), "batch": IntDistribution(32, 256, log=True),
         "ema": FloatDistribution(0.9, 0.999), "loss": CategoricalDistribution(["l2", "huber", "lpips"])}


def _suggest_all(trial):
    return {"lr": trial.suggest_float("lr", 1e-5, 3e-3, log=True), "batch": trial.suggest_int("batch", 32, 256, log=True),
            "ema": trial.suggest_float("ema", 0.9, 0.999), "loss": trial.suggest_categorical("loss", ["l2", "huber", "lpips"])}


def test_qmc_point_n_is_the_nth_scrambled_sobol_point():
    block = qmc.Sobol(4, scramble=True, seed=7).random(16)
    for n in (0, 1, 5, 15):
        assert (unit_point("qmc", 7, n, 4) == block[n]).all()
    assert (unit_point("random", 7, 3, 4) == unit_point("random", 7, 3, 4)).all()
    assert not (unit_point("random", 7, 3, 4) == unit_point("random", 7, 4, 4)).any()
    assert not (unit_point("random", 7, 3, 4) == unit_point("random", 8, 3, 4)).any()
    with pytest.raises(ValueError, match="sampler kind: 'grid' is not one of qmc, random"):
        TrialPointSampler("grid", 0, SPACE)


def test_from_unit_covers_each_distribution_evenly():
    grid = [i / 1000 for i in range(1000)]
    lr = [from_unit(u, SPACE["lr"]) for u in grid]
    assert min(lr) == 1e-5 and 1e-5 <= max(lr) <= 3e-3 and lr == sorted(lr)
    assert from_unit(0.5, SPACE["lr"]) == pytest.approx((1e-5 * 3e-3) ** 0.5)  # log-uniform: the geometric middle
    batches = [from_unit(u, SPACE["batch"]) for u in grid]
    assert set(batches) == set(range(32, 257)) and all(isinstance(b, int) for b in batches)
    assert [from_unit(u, SPACE["loss"]) for u in (0.0, 0.34, 0.999)] == ["l2", "huber", "lpips"]
    assert from_unit(0.25, SPACE["ema"]) == pytest.approx(0.9 + 0.25 * 0.099)


@pytest.mark.parametrize("kind", ["qmc", "random"])
def test_trial_n_gets_its_point_whatever_the_order_and_worker(kind):
    expected = {n: {name: from_unit(u, d) for u, (name, d) in zip(unit_point(kind, 3, n, 4), sorted(SPACE.items()))}
                for n in range(6)}
    alone = optuna.create_study(sampler=TrialPointSampler(kind, 3, SPACE))
    alone.optimize(lambda t: sum(map(hash, _suggest_all(t).values())) % 7, n_trials=6)
    assert {t.number: t.params for t in alone.trials} == expected

    # two "workers" (samplers of their own) on one storage, trials asked and told out of order
    storage = optuna.storages.InMemoryStorage()
    a, b = (optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                sampler=TrialPointSampler(kind, 3, SPACE)) for _ in range(2))
    asked = [a.ask(), b.ask(), b.ask(), a.ask(), b.ask(), a.ask()]
    drawn = {t.number: _suggest_all(t) for t in reversed(asked)}
    for t in asked[::-1]:
        (a if t.number % 2 else b).tell(t, 0.0)
    assert drawn == expected
    # a retry enqueued with a dead trial's parameters keeps them, at its own number
    a.enqueue_trial(expected[1])
    retry = a.ask()
    assert retry.number == 6 and _suggest_all(retry) == expected[1]


def test_a_parameter_outside_the_space_is_refused():
    study = optuna.create_study(sampler=TrialPointSampler("qmc", 0, {"lr": SPACE["lr"]}))
    trial = study.ask()
    with pytest.raises(ValueError, match=r"trial 0 asks for ema .* not in the spec's space \(lr\)"):
        trial.suggest_float("ema", 0.9, 0.999)


@pytest.mark.parametrize("name", SHIPPED_SPECS)
def test_shipped_specs_draw_distinct_points_inside_their_space(name):
    _, spec = shipped_spec(name)
    if spec.sampler == "tpe":
        pytest.skip("TPE adapts to finished trials")
    sampler = TrialPointSampler(spec.sampler, spec.sampler_seed, distributions(spec))
    study = optuna.create_study(sampler=sampler)
    points = []
    for _ in range(spec.trials):
        trial = study.ask()
        points.append(tuple(_suggest(trial, k, d) for k, d in distributions(spec).items()))
        study.tell(trial, 0.0)
    assert len(set(points)) == spec.trials
