"""The Gaussian-mixture benchmark end to end: `dvc repro` on `data.dataset: gmm` scores every model
against the exact flow map (flowmap_err, mode coverage and precision) and reports on flowmap_err."""
import json

import numpy as np
import pytest
from conftest import make_repo, sh



@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo, env = make_repo(tmp_path_factory.mktemp("gmm"), "smoke", {
        "data": {"dataset": "gmm", "gmm": {"dim": 4, "components": 4, "spread": 2.0, "scale": 0.2}},
        "posttrain": {"methods": ["ect"], "seeds": [0]}, "studies": {"specs": []},
        "report": {"metric": "flowmap_err_2step"}})
    sh("dvc repro", repo, env)
    return repo, env


def test_every_evaluation_is_scored_against_the_exact_map(repo):
    repo, _ = repo
    for init in ("random", "diffusion", "cmt"):
        m = json.loads((repo / f"artifacts/evaluate/ect/{init}/seed0/metrics.json").read_text())
        for k in (1, 2):
            assert m[f"flowmap_err_{k}step_n1000"] > 0  # a network is never exact
            assert 0 <= m[f"mode_precision_{k}step_n1000"] <= 1 and 0 <= m[f"mode_coverage_{k}step_n1000"] <= 1
    # the features stage saved the exact samples every stage scores against; they are the exact map's
    saved = np.load(repo / "artifacts/features/exact/n1000.npz")
    assert saved["1step"].shape == (1000, 4) and np.isfinite(saved["2step"]).all()
    data = np.load(repo / "artifacts/features/exact/n500.npz")
    # the same noise, the first 500 of 1000 (solved as another batch: equal to the solve's tolerance)
    assert np.allclose(data["1step"], saved["1step"][:500], atol=1e-7)


def test_report_rests_on_flowmap_err(repo):
    repo, _ = repo
    summary = json.loads((repo / "reports/smoke/summary.json").read_text())
    assert summary["metric"] == "flowmap_err_2step" and summary["noise_floor"] is None
    report = (repo / "reports/smoke/report.md").read_text()
    assert "`gmm`, 4-D points from 4 Gaussians" in report and "`flowmap_err`: the mean distance" in report
    assert "| ECT | cmt |" in report  # the before/after table: did post-training help, on the exact metric
