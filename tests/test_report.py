"""Compute to target and claim verdicts on synthetic curves whose answers are known by hand: the
ratios under both accountings, their intervals over seeds, and did post-training help."""
import math

import numpy as np
import pandas as pd
import pytest

from cmt_bench import claim_text, evidence
from cmt_bench.config import ReportConfig
from cmt_bench.evidence import Evidence
from cmt_bench.verdicts import ACCOUNTING_UNKNOWN, FAILS, HOLDS, NOT_RESOLVED, NOT_TESTED, TOO_FEW_SEEDS


def measured(claim: dict) -> str:
    """The report's sentence for a claim, under the default rules (report: in params)."""
    return claim_text.measured(claim, ReportConfig())


PRETRAIN = 10.0  # device-hours of the teacher
MID = {"random": None, "diffusion": 0.0, "cmt": 4.0}  # beyond the teacher (None: no teacher either)


GIGA = 1e9  # counted FLOPs per device-hour, unless a test makes the measures disagree


def _evidence(values: dict[tuple[str, str], list[list[float]]], floor=None, methods=("ect",), mid=None,
              rules=ReportConfig(), flops_mid=None) -> Evidence:
    """Curves of 5 logged points (100 images, 1 device-hour and GIGA FLOPs apart) per (method, init),
    one list of values per seed; the 1-step metric is the 2-step one times 2. Upstream: the teacher
    (PRETRAIN) for diffusion and cmt, plus cmt's trajectories and mid-training (`mid`, default
    MID['cmt']; in FLOPs `flops_mid` x GIGA, default the same as in hours)."""
    extra = {**MID, **({"cmt": mid} if mid is not None else {})}
    flops_extra = {**extra, **({"cmt": flops_mid} if flops_mid is not None else {})}
    rows = []
    for (method, init), seeds in values.items():
        given, flops_given = extra[init] or 0.0, flops_extra[init] or 0.0
        teacher = 0.0 if extra[init] is None else PRETRAIN
        for seed, curve in enumerate(seeds):
            for step, v in enumerate(curve):
                rows.append({"method": method, "init": init, "seed": seed, "step": step, "images_seen": 100.0 * step,
                             "device_hours": float(step), "hours_total": given + teacher + step,
                             "hours_given_teacher": given + step, "total_hours": given + teacher + step,
                             "flops": GIGA * step, "flops_total": GIGA * (flops_given + teacher + step),
                             "flops_given_teacher": GIGA * (flops_given + step),
                             "m_2step": v, "m_1step": 2 * v})
    curves = pd.DataFrame(rows)
    last = curves.sort_values("step").groupby(["method", "init", "seed"]).last().reset_index()
    finals = last.rename(columns={"device_hours": "posttrain_hours"}).assign(
        **{"eval_m_2step": last["m_2step"], "eval_m_1step": last["m_1step"]})
    res = Evidence(metric="m_2step", metric_1step="m_1step", inloop_n=100, final_n=1000, methods=list(methods),
                   inits=["random", "diffusion", "cmt"],
                   seeds=sorted(curves.seed.unique().tolist()), curves=curves,
                   mean=evidence.mean_curves(curves, ["m_2step", "m_1step"]), finals=finals, stage_hours={},
                   upstream={}, floor=floor, floor_n=100 if floor else None, features={}, device="cpu", post_runs={},
                   rules=rules)
    res.targets, res.to_target = evidence.compute_to_target(res)
    return res


RANDOM = [2, 1.8, 1.6, 1.4, 1.2]  # reaches its own final 1.2 at step 4
DIFFUSION = [1, 0.9, 0.7, 0.6, 0.5]  # reaches its own final 0.5 at step 4
CMT = [0.6, 0.5, 0.45, 0.4, 0.4]  # reaches 0.5 at step 1, 1.2 at step 0


def test_reach_interpolates_between_logged_points():
    curve = pd.DataFrame({"m": [1.0, 0.8, 0.4], "device_hours": [0.0, 1.0, 2.0], "images_seen": [0, 100, 200]})
    assert evidence.reach(curve, "m", 0.6) == {"device_hours": 1.5, "images_seen": 150}
    assert evidence.reach(curve, "m", 1.0) == {"device_hours": 0.0, "images_seen": 0}
    assert evidence.reach(curve, "m", 0.3) is None


def test_exact_ratios_under_both_accountings():
    """Three identical seeds: the intervals are points. CMT reaches diffusion's final at step 1:
    every stage counted 10 + 4 + 1 against 10 + 4, with the teacher given 4 + 1 against 4."""
    three = {("ect", "random"): [RANDOM] * 3, ("ect", "diffusion"): [DIFFUSION] * 3, ("ect", "cmt"): [CMT] * 3}
    claim = evidence.claim_cmt_vs_diffusion(_evidence(three), "ect")
    assert claim["ratio_total"] == pytest.approx(15 / 14) and claim["ratio_given_teacher"] == pytest.approx(5 / 4)
    assert claim["low_total"] == claim["high_total"] == pytest.approx(15 / 14)
    assert claim["ratio_posttrain"] == pytest.approx(1 / 4) and claim["verdict"] == FAILS
    assert claim["facts"]["accounting"] == "given_teacher"  # ECT's figures start from EDM checkpoints
    text = measured(claim)
    assert "with the teacher given (its pre-training not counted) (the paper's accounting) 1.25" in text
    assert "CMT seeds reaching it: 3/3" in text
    cheap = evidence.claim_cmt_vs_diffusion(_evidence(three, mid=0.5), "ect")  # 11.5 / 14 and 1.5 / 4
    assert cheap["verdict"] == HOLDS and cheap["ratio_total"] == pytest.approx(11.5 / 14)


def test_accountings_disagree_against_random():
    """Random needs no teacher: with it counted CMT costs (10 + 1 + 0) against 4, without it 1 against 4.
    ECT's claim follows the paper's accounting (teacher given); a method whose paper does not say
    is not resolved, and MeanFlow's (everything counted) does not hold."""
    values = {(m, i): [c] * 3 for m in ("ect", "sct", "meanflow")
              for i, c in (("random", RANDOM), ("diffusion", DIFFUSION), ("cmt", CMT))}
    res = _evidence(values, methods=("ect", "sct", "meanflow"), mid=1.0)
    ect, sct, mf = (evidence.claim_cmt_vs_random(res, m) for m in ("ect", "sct", "meanflow"))
    assert ect["ratio_total"] == pytest.approx(11 / 4) and ect["ratio_given_teacher"] == pytest.approx(1 / 4)
    assert ect["verdict"] == HOLDS and mf["verdict"] == FAILS
    assert sct["verdict"] == NOT_RESOLVED and sct["reason"] == ACCOUNTING_UNKNOWN
    assert "the two accountings disagree" in measured(sct)


def test_seed_spread_gives_an_interval_and_what_it_could_resolve():
    """Seeds that disagree (CMT reaches diffusion's final at steps 1 to 3.7): the bootstrap interval
    straddles 1, so not resolved; `resolvable` is the ratio this interval's half-width (in log ratio)
    would tell from 1. A narrower interval (the confidence is a parameter) from the same seeds decides."""
    spread = [[0.6, 0.5, 0.45, 0.4, 0.4], [1.0, 0.95, 0.9, 0.8, 0.45], [0.7, 0.55, 0.5, 0.45, 0.4]]
    values = {("ect", "random"): [RANDOM] * 3, ("ect", "diffusion"): [DIFFUSION] * 3, ("ect", "cmt"): spread}
    claim = evidence.claim_cmt_vs_diffusion(_evidence(values, mid=1.0), "ect")
    iv = claim["facts"]["intervals"]["given_teacher"]
    assert iv["low"] < 1 < iv["high"] and claim["verdict"] == NOT_RESOLVED and claim["reason"] is None
    assert iv["resolvable"] == pytest.approx(math.exp(-(math.log(iv["high"]) - math.log(iv["low"])) / 2))
    assert f"resolves ratios below {iv['resolvable']:.2f}" in measured(claim)
    narrow = evidence.claim_cmt_vs_diffusion(_evidence(values, mid=1.0, rules=ReportConfig(confidence=0.2)), "ect")
    assert narrow["verdict"] == FAILS and narrow["low_given_teacher"] > 1
    again = evidence.claim_cmt_vs_diffusion(_evidence(values, mid=1.0), "ect")  # a seeded bootstrap: rerun, same interval
    assert again["facts"]["intervals"] == claim["facts"]["intervals"]


def test_too_few_seeds_decide_nothing():
    one = _evidence({("ect", "random"): [RANDOM], ("ect", "diffusion"): [DIFFUSION], ("ect", "cmt"): [CMT]}, mid=0.5)
    claim = evidence.claim_cmt_vs_diffusion(one, "ect")
    assert claim["verdict"] == NOT_RESOLVED and claim["reason"] == TOO_FEW_SEEDS
    assert claim["ratio_total"] == pytest.approx(11.5 / 14)  # the point ratio is still reported
    assert "fewer than 3 seeds: no interval decides" in measured(claim)


def test_cmt_that_never_reaches_does_not_hold_and_a_target_at_the_floor_is_not_resolved():
    values = {("ect", "random"): [RANDOM] * 3, ("ect", "diffusion"): [DIFFUSION] * 3,
              ("ect", "cmt"): [[1, 0.9, 0.8, 0.7, 0.6]] * 3}
    assert evidence.claim_cmt_vs_diffusion(_evidence(values), "ect")["verdict"] == FAILS
    at_floor = evidence.claim_cmt_vs_diffusion(_evidence(values, floor=0.45), "ect")
    assert at_floor["verdict"] == NOT_RESOLVED and "noise floor (0.45)" in measured(at_floor)


def test_cmt_versus_random_savings_and_seed_count():
    # random's mean curve ends at 1.0 at step 4 (400 images, 4 h); CMT's mean gets there at step 1
    res = _evidence({("ect", "random"): [[2, 1.8, 1.6, 1.3, 1.1], [2, 1.8, 1.4, 1.1, 0.9], [2, 1.8, 1.5, 1.2, 1.0]],
                     ("ect", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]] * 3,
                     ("ect", "cmt"): [[1.2, 1.0, 0.9, 0.8, 0.7]] * 3})
    claim = evidence.claim_cmt_vs_random(res, "ect")
    assert claim["saving_data"] == pytest.approx(1 - 100 / 400)
    assert claim["saving_posttrain"] == pytest.approx(1 - 1 / 4)
    assert claim["ratio_total"] == pytest.approx(15 / 4) and claim["ratio_given_teacher"] == pytest.approx(5 / 4)
    assert "75% less post-training data" in measured(claim)
    t = res.to_target
    rnd = t[(t.metric == "m_2step") & (t.target_init == "random") & (t.init == "random")].iloc[0]
    assert (rnd["seeds_reached"], rnd["seeds"]) == (2, 3)  # the seed that ended at 1.1 never got to 1.0


def test_a_baseline_that_needed_nothing_cannot_be_beaten():
    """Random's first logged point already beats its final value: it reached its own target with no
    post-training, so CMT (some upstream compute) cannot save any: an unbounded ratio, not NaN."""
    res = _evidence({("ect", "random"): [[1.0, 1.5, 1.4, 1.3, 1.2]] * 3,
                     ("ect", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]] * 3,
                     ("ect", "cmt"): [[0.9, 0.8, 0.7, 0.6, 0.5]] * 3})
    claim = evidence.claim_cmt_vs_random(res, "ect")
    assert claim["verdict"] == FAILS and math.isinf(claim["ratio_given_teacher"])
    assert "nan" not in measured(claim) and "∞" in measured(claim)


def test_meanflow_claim_needs_meanflow_and_sensitivity_is_not_tested():
    res = _evidence({("ect", i): [[1, 0.9, 0.8, 0.7, 0.6]] * 3 for i in ("random", "diffusion", "cmt")})
    assert evidence.claim_from_scratch(res, "meanflow")["verdict"] == NOT_TESTED
    assert evidence.claim_sensitivity()["verdict"] == NOT_TESTED
    # the 1-step target (random's final 2 x 1.2) is reached by CMT at step 1: total 10 + 0.5 + 1 against 4
    res = _evidence({("meanflow", "random"): [RANDOM] * 3, ("meanflow", "diffusion"): [[1.5, 1.2, 1.0, 0.9, 0.8]] * 3,
                     ("meanflow", "cmt"): [[1.4, 1.2, 1.0, 0.9, 0.8]] * 3}, methods=("meanflow",), mid=0.5)
    claim = evidence.claim_from_scratch(res, "meanflow")
    assert claim["facts"]["accounting"] == "total" and claim["ratio_total"] == pytest.approx(11.5 / 4)
    assert claim["verdict"] == FAILS and claim["cmt_final_not_worse"]
    assert [c["id"] for c in evidence.claims(res)] == [1, 2, 3, 4]


def test_each_method_row_quotes_the_papers_figure_for_that_method():
    """ECT's claims quote the paper's consistency-model figures; MeanFlow's claim 2 quotes the paper's
    MeanFlow-from-scratch figure, and its claim 1 says the paper gives no MeanFlow figure against diffusion."""
    values = {(m, i): [[2, 1.8, 1.6, 1.4, 1.2]] * 3 for m in ("ect", "meanflow") for i in ("random", "diffusion", "cmt")}
    res = _evidence(values, methods=("ect", "meanflow"))
    assert "(paper: up to 98% less)" in measured(evidence.claim_cmt_vs_random(res, "ect"))
    assert "(paper: about 50% less)" in measured(evidence.claim_cmt_vs_random(res, "meanflow"))
    assert "CIFAR-10: 2-step FID 1.97" in claim_text.paper(1, "ect")
    assert claim_text.paper(1, "meanflow").startswith("no MeanFlow figure against a diffusion init")
    assert "3.34 vs 3.43" in claim_text.paper(2, "meanflow") and "98%" not in claim_text.paper(2, "meanflow")
    assert "3.34 vs 3.43" in claim_text.paper(3, "meanflow") and claim_text.paper(4, "ect") == claim_text.SENSITIVITY_PAPER
    assert claim_text.paper(3, "ect") == "the paper gives no figure for ECT"
    assert claim_text.paper(1, "sct") == "the paper gives no figure for sCT"


def test_did_posttraining_help():
    """Per init: the change from images seen = 0 to the end with its interval over seeds. The CMT init
    here starts best and gets worse, random improves, diffusion's seeds disagree."""
    res = _evidence({("ect", "random"): [RANDOM, [2.1, 1.9, 1.7, 1.5, 1.3], [1.9, 1.7, 1.5, 1.3, 1.1]],
                     ("ect", "diffusion"): [[1.0, 1.0, 1.0, 1.0, 0.8], [1.0, 1.1, 1.2, 1.2, 1.2], [1.0] * 5],
                     ("ect", "cmt"): [[0.04, 0.05, 0.05, 0.05, 0.05], [0.04, 0.045, 0.05, 0.05, 0.052],
                                      [0.041, 0.05, 0.05, 0.05, 0.049]]})
    effect = evidence.posttrain_effect(res).set_index("init")
    assert effect.at["random", "effect"] == "improved" and effect.at["random", "change"] == pytest.approx(-0.8)
    assert effect.at["cmt", "effect"] == "worse" and effect.at["cmt", "low"] > 0
    assert effect.at["diffusion", "effect"] == "unresolved"
    assert effect.at["cmt", "before"] == pytest.approx(np.mean([0.04, 0.04, 0.041]))
    line = claim_text.effect_line(evidence.posttrain_effect(res).iloc[2])
    assert line.startswith("| ECT | cmt |") and "**worse**" in line


def test_the_verdict_rests_on_the_measure_report_measure_names():
    """Mid-training took 0.5 device-hours but 4 GIGA of counted FLOPs (the machine was fast that
    hour): with the teacher given, CMT needs 1.5 / 4 h of wall time but 5 / 4 of the FLOPs. The
    verdict follows report.measure (FLOPs by default) and the text gives the other measure beside it."""
    three = {("ect", "random"): [RANDOM] * 3, ("ect", "diffusion"): [DIFFUSION] * 3, ("ect", "cmt"): [CMT] * 3}
    on_flops = evidence.claim_cmt_vs_diffusion(_evidence(three, mid=0.5, flops_mid=4.0), "ect")
    assert on_flops["verdict"] == FAILS and on_flops["facts"]["measure"] == "flops"
    assert on_flops["ratio_given_teacher"] == pytest.approx(5 / 4)
    assert on_flops["ratio_given_teacher_device_hours"] == pytest.approx(1.5 / 4)
    text = measured(on_flops)
    assert "in counted FLOPs (the verdict's measure): " in text and "; in wall time: " in text
    assert "on wall time alone the verdict would be: holds at this scale" in text
    on_wall = evidence.claim_cmt_vs_diffusion(
        _evidence(three, mid=0.5, flops_mid=4.0, rules=ReportConfig(measure="device_hours")), "ect")
    assert on_wall["verdict"] == HOLDS and on_wall["ratio_given_teacher"] == pytest.approx(1.5 / 4)
    assert on_wall["ratio_given_teacher_flops"] == pytest.approx(5 / 4)
    assert "on counted FLOPs alone the verdict would be: does not hold at this scale" in measured(on_wall)
    assert on_wall["verdict_flops"] == FAILS and on_flops["verdict_device_hours"] == HOLDS
    # a method whose paper names no accounting: the verdict both accountings share, on each measure
    # (FLOPs 15 / 14 and 5 / 4: both above 1; wall time 11.5 / 14 and 1.5 / 4: both below)
    sct = evidence.claim_cmt_vs_diffusion(_evidence({("sct", i): v for (_, i), v in three.items()},
                                                    methods=("sct",), mid=0.5, flops_mid=4.0), "sct")
    assert sct["facts"]["accounting"] is None and (sct["verdict"], sct["reason"]) == (FAILS, None)
    assert sct["verdict_device_hours"] == HOLDS
    assert "on wall time alone the verdict would be: holds at this scale" in measured(sct)
