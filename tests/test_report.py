"""The claim verdict: holds / does not hold, and not resolved where noise cannot tell."""
import pandas as pd

from cmt_bench.report import claim_cmt_vs_diffusion


def _table(cmt_total, diff_total, cmt_images=1000):
    return pd.DataFrame([
        {"init": "diffusion", "total_hours_to_target": diff_total, "posttrain_hours_to_target": diff_total / 2,
         "images_to_target": 5000},
        {"init": "cmt", "total_hours_to_target": cmt_total, "posttrain_hours_to_target": cmt_total / 4,
         "images_to_target": cmt_images},
    ]).set_index("init")


def test_verdicts():
    verdict = lambda table, target=0.5, floor=0.1: claim_cmt_vs_diffusion(table, "ect", target, floor)["verdict"]
    assert verdict(_table(0.5, 1.0)) == "holds at this scale"
    assert verdict(_table(1.5, 1.0)) == "does not hold at this scale"
    assert verdict(_table(float("nan"), 1.0)) == "does not hold at this scale"  # CMT never got there
    assert verdict(_table(0.95, 1.0)) == "not resolved at this scale"  # a tie within wall-time noise
    assert verdict(_table(0.5, 1.0), target=0.12, floor=0.1) == "not resolved at this scale"  # target at the floor
    assert verdict(_table(0.5, 1.0), floor=None) == "holds at this scale"  # no floor measured: compute decides
    floor_claim = claim_cmt_vs_diffusion(_table(0.5, 1.0), "meanflow", 0.12, 0.1)
    assert "noise floor (0.1)" in floor_claim["measured"] and floor_claim["claim"].startswith("Post-training (MeanFlow)")
