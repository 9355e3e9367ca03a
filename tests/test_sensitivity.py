"""Hyperparameter sensitivity (claim 4) on real in-memory Optuna studies whose landscapes are known
by construction: a flat one (every trial within 2% of the best), a sharp one (only lr near 1e-3
is good), and one that prunes, diverges and fails on fixed trial numbers."""
from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest
from PIL import Image

from cmt_bench import sensitivity as sens
from cmt_bench.claim_text import measured_sensitivity
from cmt_bench.config import ReportConfig
from cmt_bench.verdicts import FAILS, HOLDS, NOT_RESOLVED, NOT_TESTED

optuna.logging.set_verbosity(optuna.logging.WARNING)
LR, Q, BS = "posttrain.train.lr", "posttrain.ect.q", "posttrain.train.batch_size"
LOG = (LR, Q)
N = 30


def _space(trial):
    return trial.suggest_float(LR, 1e-5, 1e-1, log=True), trial.suggest_float(Q, 2, 256, log=True), \
        trial.suggest_categorical(BS, [128, 256, 512])


def flat(trial):
    lr, q, bs = _space(trial)
    noise = (7.3 * math.log10(lr) + 3.1 * math.log2(q) + bs / 128) % 1  # deterministic, in [0, 1)
    return 1 + 0.02 * noise


def sharp(trial):
    lr, _, _ = _space(trial)
    return 1 + 4 * (math.log10(lr) + 3) ** 2


def unstable(trial):
    """Trial n: diverges if n % 5 == 0, pruned if n % 7 == 3, crashes if n % 11 == 4, else flat."""
    value = flat(trial)
    if trial.number % 5 == 0:
        trial.set_user_attr("diverged", True)
        raise optuna.TrialPruned()
    if trial.number % 7 == 3:
        raise optuna.TrialPruned()
    if trial.number % 11 == 4:
        raise ValueError("worker crashed")
    return value


def study(objective, init, n=N, seed=0):
    s = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=seed))
    s.set_user_attr("init", init), s.set_user_attr("metric", "sw"), s.set_user_attr("method", "ect")
    s.optimize(objective, n_trials=n, catch=(ValueError,))
    return s


def fixed(values, diverged=0):
    """A study whose completed trials have exactly these values (lr spread over the range), plus
    `diverged` diverged trials."""
    s = optuna.create_study(direction="minimize")
    dist = {LR: optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    for i, v in enumerate(values):
        lr = 10 ** (-5 + 4 * i / len(values))
        s.add_trial(optuna.trial.create_trial(params={LR: lr}, distributions=dist, value=v))
    for i in range(diverged):
        s.add_trial(optuna.trial.create_trial(params={LR: 0.05}, distributions=dist, user_attrs={"diverged": True},
                                              state=optuna.trial.TrialState.PRUNED))
    return s


@pytest.fixture(scope="module")
def studies():
    return {"random": study(sharp, "random", seed=1), "diffusion": study(unstable, "diffusion", seed=2),
            "cmt": study(flat, "cmt", seed=3)}


@pytest.fixture(scope="module")
def frame(studies):
    return sens.trials_frame(studies)


def test_frame_and_spread_count_what_the_objectives_did(studies, frame):
    numbers = range(N)
    diverged = [n for n in numbers if n % 5 == 0]
    pruned = [n for n in numbers if n % 5 and n % 7 == 3]
    failed = [n for n in numbers if n % 5 and n % 7 != 3 and n % 11 == 4]
    d = frame[frame.init == "diffusion"].set_index("number")
    assert d.index[d.diverged].tolist() == diverged and d.index[d.pruned].tolist() == pruned
    assert d.index[d.state == "FAIL"].tolist() == failed
    assert d.loc[d.state != "COMPLETE", "value"].isna().all()
    assert d.loc[d.state == "COMPLETE", "value"].between(1, 1.02).all()
    assert set(frame.columns) >= {LR, Q, BS, "duration_seconds"} and frame.attrs["metric"] == "sw"
    assert frame.retried_from.isna().all()

    s = sens.spread(frame)
    assert s.index.tolist() == ["random", "diffusion", "cmt"]
    finished = N - len(failed)  # FAIL trials are retried, not outcomes
    assert s.loc["diffusion", ["finished", "completed", "pruned", "diverged"]].tolist() == \
        [finished, finished - len(diverged) - len(pruned), len(pruned), len(diverged)]
    assert s.at["diffusion", "diverged_fraction"] == pytest.approx(len(diverged) / finished)
    # pruned and diverged trials count as not within; every completed flat trial is within
    assert s.at["diffusion", "within_best"] == pytest.approx((finished - len(diverged) - len(pruned)) / finished)
    assert s.loc["cmt", ["finished", "completed", "pruned", "diverged"]].tolist() == [N, N, 0, 0]
    assert s.at["cmt", "within_best"] == 1.0
    assert s.at["random", "within_best"] < 0.5
    assert s.at["random", "best"] == frame[frame.init == "random"].value.min()


def test_counted_keeps_the_first_finished_trials_by_number(frame):
    """Workers that overshoot the trial count must not change the statistics: per init the
    analysis takes the first n finished trials by number (FAIL trials are not outcomes)."""
    c = sens.counted(frame.sample(frac=1, random_state=0), 10)  # any row order
    assert c.groupby("init").size().to_dict() == {"random": 10, "diffusion": 10, "cmt": 10}
    finished = frame[(frame.init == "diffusion") & frame.state.isin(sens.FINISHED)].number.sort_values()
    assert c[c.init == "diffusion"].number.tolist() == finished.tolist()[:10]
    assert c.attrs["metric"] == "sw"


def test_importances_over_the_counted_trials_only():
    """Trials 0-5 vary only `a` (value = a); trials 6-11 vary only `b` (value = 10 b): over the
    first six `a` explains everything, over all twelve `b` dominates."""
    dist = {"a": optuna.distributions.FloatDistribution(0, 1), "b": optuna.distributions.FloatDistribution(0, 1)}
    study = optuna.create_study()
    for i in range(6):
        study.add_trial(optuna.trial.create_trial(params={"a": i / 5, "b": 0.5}, distributions=dist, value=i / 5))
    for j in range(6):
        study.add_trial(optuna.trial.create_trial(params={"a": 0.5, "b": j / 5}, distributions=dist, value=2 * j))
    imp = {key: sens.importances({"cmt": study}, numbers).query("evaluator == 'fanova'").set_index("param").importance
           for key, numbers in (("all", None), ("first six", {"cmt": range(6)}))}
    assert imp["first six"]["a"] > 0.9 and imp["all"]["b"] > imp["all"]["a"], imp


def test_importances_copy_the_counted_trials_without_logging_a_new_study(studies):
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        sens.importances(studies, {init: range(10) for init in studies})
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna").removeHandler(handler)
    assert not [r for r in records if "A new study created" in r.getMessage()]
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING


def test_running_trials_are_ignored_and_retries_recorded():
    s = fixed([1.0, 2.0])
    s.add_trial(optuna.trial.create_trial(params={LR: 1e-3}, distributions=s.trials[0].distributions, value=1.5,
                                          system_attrs={"failed_trial": 1}))
    s.ask()  # left RUNNING
    f = sens.trials_frame({"cmt": s})
    assert f.number.tolist() == [0, 1, 2] and f.retried_from.tolist()[2] == 1 and f.retried_from.isna().sum() == 2


def test_lr_is_the_most_important_param_of_the_sharp_study(studies):
    imp = sens.importances(studies)
    for evaluator in ("ped_anova", "fanova"):
        r = imp[(imp.init == "random") & (imp.evaluator == evaluator)].set_index("param").importance
        assert r.idxmax() == LR, (evaluator, r.to_dict())
        assert r.sum() == pytest.approx(1.0)
    # too few completed trials, or equal values: no rows for that evaluator, no crash
    few = sens.importances({"cmt": fixed([1.0])})
    assert few.empty
    equal = sens.importances({"cmt": fixed([1.0] * 8)})
    assert "fanova" not in set(equal.evaluator)


def _claim(**inits):
    return sens.sensitivity_claim(sens.trials_frame(inits), ReportConfig(resamples=500))


def test_claim_holds_when_cmt_is_flat_and_the_others_sharp():
    out = _claim(random=study(sharp, "random", seed=1), diffusion=study(sharp, "diffusion", seed=2),
                 cmt=study(flat, "cmt", seed=3))
    assert out["verdict"] == HOLDS, out
    for c in out["comparisons"].values():
        assert c["cmt"] == 1.0 and c["ci90"][0] > 0 and c["difference"] > 0.5
    assert "cmt 100% of 30" in measured_sensitivity(out)
    assert json.loads(json.dumps(out)) == out  # plain floats: the report writes it as JSON


def test_claim_does_not_hold_when_cmt_is_sharp():
    out = _claim(random=study(flat, "random", seed=1), diffusion=study(flat, "diffusion", seed=2),
                 cmt=study(sharp, "cmt", seed=3))
    assert out["verdict"] == FAILS and all(c["difference"] < 0 for c in out["comparisons"].values())


def test_claim_does_not_hold_when_cmt_diverges_more():
    cmt = fixed([1.0] * 14, diverged=6)  # 14 of 20 within, 30% diverged
    out = _claim(random=study(sharp, "random", seed=1), cmt=cmt)
    c = out["comparisons"]["random"]
    assert c["difference"] > 0 and c["cmt_diverged"] == pytest.approx(0.3) and c["other_diverged"] == 0
    assert out["verdict"] == FAILS


def test_claim_not_resolved_when_ahead_by_one_trial_in_eight():
    out = _claim(random=fixed([1.0] * 4 + [2.0] * 4), cmt=fixed([1.0] * 5 + [2.0] * 3))
    c = out["comparisons"]["random"]
    assert c["difference"] == pytest.approx(1 / 8) and c["ci90"][0] <= 0 < c["ci90"][1]
    assert out["verdict"] == NOT_RESOLVED


def test_common_target_share_is_reported_beside_the_verdict():
    """CMT's every trial beats random's best, yet both spread alike around their own bests: the relative
    measure (the verdict) sees no difference, the common target (within 10% of random's best) does."""
    out = _claim(random=fixed([10.0, 20.0, 30.0, 40.0, 50.0] * 4), cmt=fixed([1.0, 2.0, 3.0, 4.0, 5.0] * 4))
    c = out["comparisons"]["random"]
    assert c["difference"] == 0 and out["verdict"] == FAILS
    assert c["target"] == pytest.approx(11.0) and (c["cmt_reach"], c["other_reach"]) == (1.0, 0.2)
    assert c["reach_difference"] == pytest.approx(0.8) and c["reach_ci90"][0] > 0.5
    assert "vs random (at most 11): cmt 100% vs 20% (difference +0.80" in measured_sensitivity(out)


def test_claim_not_tested_without_enough_trials_or_inits():
    assert _claim(random=fixed([1.0, 2.0, 3.0] * 3), cmt=fixed([1.0] * 3))["verdict"] == NOT_TESTED
    assert _claim(random=fixed([1.0] * 8), diffusion=fixed([1.0] * 8))["verdict"] == NOT_TESTED
    out = sens.sensitivity_claim(sens.trials_frame({"random": fixed([1.0] * 8), "cmt": fixed([1.0] * 8)}),
                                 ReportConfig(min_trials=9))
    assert out["verdict"] == NOT_TESTED and "cmt (8)" in measured_sensitivity(out)


def _non_blank(path):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    return pixels.std() > 5


def test_plots_write_non_blank_pngs(studies, frame, tmp_path):
    assert _non_blank(sens.plot_slices(frame, tmp_path / "slices.png", log_params=LOG))
    assert _non_blank(sens.plot_spread(frame, tmp_path / "spread.png"))
    imp = sens.importances(studies)
    assert _non_blank(sens.plot_contours(frame, imp, tmp_path / "contours.png", log_params=LOG))
    assert sens._top_two(frame, imp)[0] in (LR, Q, BS)


def test_contours_need_two_numeric_params(tmp_path):
    def objective(trial):
        lr = trial.suggest_float(LR, 1e-5, 1e-1, log=True)
        return 1 + (trial.suggest_categorical("posttrain.optimizer", ["adam", "sgd"]) == "sgd") + lr
    frame = sens.trials_frame({"cmt": study(objective, "cmt", n=10)})
    assert sens.plot_contours(frame, sens.importances({}), tmp_path / "c.png", log_params=[LR]) is None
    # a string categorical still gets its slice panel
    assert _non_blank(sens.plot_slices(frame, tmp_path / "s.png", log_params=[LR]))


def test_the_report_words_a_study_claim():
    """claim_text words claim 4 from its structured result: the study's claim sentence and what was measured."""
    from cmt_bench import claim_text
    from cmt_bench.study_report import _claim
    frame = sens.trials_frame({"random": study(sharp, "random", seed=1), "cmt": study(flat, "cmt", seed=3)})
    claim = _claim({"spec": {"method": "ect", "name": "toy_ect"}}, frame, ReportConfig(resamples=200))
    assert claim_text.sentence(claim) == ("CMT makes ECT post-training less sensitive to hyperparameters "
                                          "(study `toy_ect`)")
    assert claim_text.verdict(claim) == "holds at this scale"
    assert claim_text.measured(claim, ReportConfig()).startswith("Share of finished trials within 10% of the init's")
