"""Compute to target and claim verdicts on synthetic curves whose answers are known by hand."""
import pandas as pd
import pytest

from cmt_bench import claim_text, evidence
from cmt_bench.config import ReportConfig
from cmt_bench.evidence import Evidence
from cmt_bench.verdicts import FAILS, HOLDS, NOT_RESOLVED, NOT_TESTED

def measured(claim: dict) -> str:
    """The report's sentence for a claim, under the default rules (report: in params)."""
    return claim_text.measured(claim, ReportConfig())


UPSTREAM = {"random": 0.0, "diffusion": 10.0, "cmt": 14.0}  # device-hours before post-training


def _evidence(values: dict[tuple[str, str], list[list[float]]], floor=None, methods=("ect",)) -> Evidence:
    """Curves of 5 logged points (100 images and 1 device-hour apart) per (method, init), one
    list of values per seed; the 1-step metric is the 2-step one times 2."""
    rows = []
    for (method, init), seeds in values.items():
        for seed, curve in enumerate(seeds):
            for step, v in enumerate(curve):
                rows.append({"method": method, "init": init, "seed": seed, "step": step, "images_seen": 100.0 * step,
                             "device_hours": float(step), "upstream_hours": UPSTREAM[init],
                             "total_hours": UPSTREAM[init] + step, "m_2step": v, "m_1step": 2 * v})
    curves = pd.DataFrame(rows)
    last = curves.sort_values("step").groupby(["method", "init", "seed"]).last().reset_index()
    finals = last.rename(columns={"device_hours": "posttrain_hours"}).assign(
        **{"eval_m_2step": last["m_2step"], "eval_m_1step": last["m_1step"]})
    res = Evidence(metric="m_2step", metric_1step="m_1step", inloop_n=100, final_n=1000, methods=list(methods),
                   inits=["random", "diffusion", "cmt"],
                   seeds=sorted(curves.seed.unique().tolist()), curves=curves,
                   mean=evidence.mean_curves(curves, ["m_2step", "m_1step"]), finals=finals, stage_hours={},
                   upstream={}, floor=floor, floor_n=100 if floor else None, features={}, device="cpu", post_runs={})
    res.targets, res.to_target = evidence.compute_to_target(res)
    return res


def test_reach_interpolates_between_logged_points():
    curve = pd.DataFrame({"m": [1.0, 0.8, 0.4], "device_hours": [0.0, 1.0, 2.0], "images_seen": [0, 100, 200]})
    assert evidence.reach(curve, "m", 0.6) == {"device_hours": 1.5, "images_seen": 150}
    assert evidence.reach(curve, "m", 1.0) == {"device_hours": 0.0, "images_seen": 0}
    assert evidence.reach(curve, "m", 0.3) is None


def test_cmt_versus_diffusion_holds_with_exact_ratio():
    # diffusion ends at 0.5 (its 4th point, total 10 + 4); CMT gets there at step 1 (total 14 + 1)
    res = _evidence({("ect", "random"): [[2, 1.8, 1.6, 1.4, 1.2]], ("ect", "diffusion"): [[1, 0.9, 0.7, 0.6, 0.5]],
                     ("ect", "cmt"): [[0.6, 0.5, 0.45, 0.4, 0.4]]})
    claim = evidence.claim_cmt_vs_diffusion(res, "ect")
    assert claim["verdict"] == NOT_RESOLVED  # 15 / 14 is within the wall-time tie
    assert claim["ratio_total"] == pytest.approx(15 / 14) and claim["ratio_posttrain"] == pytest.approx(1 / 4)

    UPSTREAM["cmt"] = 2.0  # cheap mid-training: 3 / 14
    try:
        res = _evidence({("ect", "random"): [[2, 1.8, 1.6, 1.4, 1.2]], ("ect", "diffusion"): [[1, 0.9, 0.7, 0.6, 0.5]],
                         ("ect", "cmt"): [[0.6, 0.5, 0.45, 0.4, 0.4]]})
    finally:
        UPSTREAM["cmt"] = 14.0
    claim = evidence.claim_cmt_vs_diffusion(res, "ect")
    assert claim["verdict"] == HOLDS and claim["ratio_total"] == pytest.approx(3 / 14)
    assert "CMT seeds reaching it: 1/1" in measured(claim)


def test_cmt_that_never_reaches_does_not_hold_and_a_target_at_the_floor_is_not_resolved():
    values = {("ect", "random"): [[2, 1.8, 1.6, 1.4, 1.2]], ("ect", "diffusion"): [[1, 0.9, 0.7, 0.6, 0.5]],
              ("ect", "cmt"): [[1, 0.9, 0.8, 0.7, 0.6]]}
    assert evidence.claim_cmt_vs_diffusion(_evidence(values), "ect")["verdict"] == FAILS
    at_floor = evidence.claim_cmt_vs_diffusion(_evidence(values, floor=0.45), "ect")
    assert at_floor["verdict"] == NOT_RESOLVED and "noise floor (0.45)" in measured(at_floor)


def test_cmt_versus_random_savings_and_seed_spread():
    # random's mean curve ends at 1.0 at step 4 (400 images, 4 h); CMT's mean gets there at step 1
    res = _evidence({("ect", "random"): [[2, 1.8, 1.6, 1.3, 1.1], [2, 1.8, 1.4, 1.1, 0.9]],
                     ("ect", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]] * 2,
                     ("ect", "cmt"): [[1.2, 1.0, 0.9, 0.8, 0.7], [1.2, 1.0, 0.9, 0.8, 0.7]]})
    claim = evidence.claim_cmt_vs_random(res, "ect")
    assert claim["saving_data"] == pytest.approx(1 - 100 / 400)
    assert claim["saving_posttrain"] == pytest.approx(1 - 1 / 4)
    assert claim["saving_total"] == pytest.approx(1 - 15 / 4)  # mid-training costs more than it saves
    assert claim["verdict"] == FAILS and "275% more total time" in measured(claim)
    t = res.to_target
    rnd = t[(t.metric == "m_2step") & (t.target_init == "random") & (t.init == "random")].iloc[0]
    assert (rnd["seeds_reached"], rnd["seeds"]) == (1, 2)  # the seed that ended at 1.1 never got to 1.0


def test_a_baseline_that_needed_nothing_is_said_so_not_nan():
    """Random's first logged point already beats its final value: it reached its own target with
    no post-training, so no share of its compute can be saved; CMT (14 h upstream) does not win."""
    res = _evidence({("ect", "random"): [[1.0, 1.5, 1.4, 1.3, 1.2]], ("ect", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]],
                     ("ect", "cmt"): [[0.9, 0.8, 0.7, 0.6, 0.5]]})
    claim = evidence.claim_cmt_vs_random(res, "ect")
    assert claim["verdict"] == FAILS and "nan" not in measured(claim)
    assert "no comparable share of (the other init needed none) total time" in measured(claim)


def test_meanflow_claim_needs_meanflow_and_sensitivity_is_not_tested():
    res = _evidence({("ect", i): [[1, 0.9, 0.8, 0.7, 0.6]] for i in ("random", "diffusion", "cmt")})
    assert evidence.claim_from_scratch(res, "meanflow")["verdict"] == NOT_TESTED
    assert evidence.claim_sensitivity()["verdict"] == NOT_TESTED
    UPSTREAM["cmt"] = 1.0
    try:
        res = _evidence({("meanflow", "random"): [[2, 1.8, 1.6, 1.4, 1.2]],
                         ("meanflow", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]],
                         ("meanflow", "cmt"): [[1.4, 1.2, 1.0, 0.9, 0.8]]}, methods=("meanflow",))
    finally:
        UPSTREAM["cmt"] = 14.0
    # the 1-step target (random's final 2 x 1.2) is reached by CMT at step 1: total 1 + 1 h against random's 4 h
    claim = evidence.claim_from_scratch(res, "meanflow")
    assert claim["verdict"] == HOLDS and claim["saving_total"] == pytest.approx(0.5) and claim["cmt_final_not_worse"]
    assert [c["id"] for c in evidence.claims(res)] == [1, 2, 3, 4]


def test_each_method_row_quotes_the_papers_figure_for_that_method():
    """ECT's claims quote the paper's consistency-model figures; MeanFlow's claim 2 quotes the paper's
    MeanFlow-from-scratch figure, and its claim 1 says the paper gives no MeanFlow figure against diffusion."""
    values = {(m, i): [[2, 1.8, 1.6, 1.4, 1.2]] for m in ("ect", "meanflow") for i in ("random", "diffusion", "cmt")}
    res = _evidence(values, methods=("ect", "meanflow"))
    assert "(paper: up to 98% less)" in measured(evidence.claim_cmt_vs_random(res, "ect"))
    assert "(paper: about 50% less)" in measured(evidence.claim_cmt_vs_random(res, "meanflow"))
    assert "CIFAR-10: 2-step FID 1.97" in claim_text.paper(1, "ect")
    assert claim_text.paper(1, "meanflow").startswith("no MeanFlow figure against a diffusion init")
    assert "3.34 vs 3.43" in claim_text.paper(2, "meanflow") and "98%" not in claim_text.paper(2, "meanflow")
    assert "3.34 vs 3.43" in claim_text.paper(3, "meanflow") and claim_text.paper(4, "ect") == claim_text.SENSITIVITY_PAPER
    assert claim_text.paper(3, "ect") == "the paper gives no figure for ECT"


def test_thresholds_are_parameters_and_the_words_follow_them():
    """The same curves under a wider wall-time tie: the claim that held becomes not resolved, and
    the sentence names the tie it used; a target at the floor under a smaller margin is decided."""
    UPSTREAM["cmt"] = 2.0
    try:
        res = _evidence({("ect", "random"): [[2, 1.8, 1.6, 1.4, 1.2]], ("ect", "diffusion"): [[1, 0.9, 0.7, 0.6, 0.5]],
                         ("ect", "cmt"): [[0.6, 0.5, 0.45, 0.4, 0.4]]})
    finally:
        UPSTREAM["cmt"] = 14.0
    assert evidence.claim_cmt_vs_diffusion(res, "ect")["verdict"] == HOLDS  # 3 / 14
    res.rules = ReportConfig(time_tie=0.9)
    claim = evidence.claim_cmt_vs_diffusion(res, "ect")
    assert claim["verdict"] == NOT_RESOLVED and claim["reason"] is None
    assert claim_text.measured(claim, res.rules).endswith("; within 90% of 1, the wall-time noise")
    assert claim_text.verdict(claim) == "not resolved at this scale"
    values = {("ect", "random"): [[2, 1.8, 1.6, 1.4, 1.2]], ("ect", "diffusion"): [[1, 0.9, 0.7, 0.6, 0.5]],
              ("ect", "cmt"): [[0.6, 0.5, 0.45, 0.4, 0.4]]}
    res = _evidence(values, floor=0.45)
    assert evidence.claim_cmt_vs_diffusion(res, "ect")["reason"] == "target_at_noise_floor"  # 0.5 <= 1.25 x 0.45
    res.rules = ReportConfig(floor_margin=1.05)
    assert evidence.claim_cmt_vs_diffusion(res, "ect")["reason"] is None
