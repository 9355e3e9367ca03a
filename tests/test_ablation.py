"""An ablation as real DVC experiments: `cmt-bench ablation run` queues one experiment per level,
runs the queue two at a time (`dvc queue start -j 2`) against an MLflow server on PostgreSQL, and
reports the CMT init's final metric and compute per level, each number traceable to MLflow."""
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_repo, mlflow_server, postgres_database, sh
from mlflow.tracking import MlflowClient

from cmt_bench.ablation import load_spec
from cmt_bench.config import ParamsError, preset

SPEC = {"preset": "smoke", "factor": "trajectories.steps", "levels": [2, 8], "method": "ect",
        "fixed": {"studies": {"specs": []}, "posttrain": {"methods": ["ect"], "seeds": [0, 1]}}}


def test_bad_ablation_specs_are_refused(tmp_path):
    from conftest import ROOT
    params = preset("smoke", ROOT)
    for changes, message in [({"factor": "trajectories.stepz"}, "factor: 'trajectories.stepz' is not a parameter"),
                             ({"levels": [0, 4]}, "levels: 0 gives invalid parameters"),
                             ({"levels": [4]}, "levels"),
                             ({"preset": "toy"}, "preset: the ablation is for preset 'toy'"),
                             ({"fixed": {"posttrain": {"methods": ["meanflow"]}}}, "method: 'ect' is not in")]:
        path = tmp_path / "a.yaml"
        path.write_text(yaml.safe_dump({**SPEC, **changes}))
        with pytest.raises(ParamsError) as err:
            load_spec(str(path), params)
        assert message in str(err.value)
    assert load_spec("toy_traj_steps", preset("toy", ROOT), ROOT).levels == [4, 8, 16, 32]
    shipped = sorted(p.stem for p in (ROOT / "experiments/ablations").glob("*.yaml"))
    factors = {load_spec(name, preset("toy", ROOT), ROOT).factor for name in shipped}
    assert factors == {"trajectories.solver", "trajectories.steps", "midtrain.train.budget_images",
                       "midtrain.distance.kind", "posttrain.train.budget_images"}  # the five factors


def test_ablation_runs_as_queued_dvc_experiments(tmp_path_factory):
    repo, env = make_repo(tmp_path_factory.mktemp("ablation"), "smoke", SPEC["fixed"])
    (repo / "experiments/ablations/steps.yaml").write_text(yaml.safe_dump(SPEC))
    sh("git add -A && git commit -qm spec", repo, env)
    tmp = tmp_path_factory.mktemp("ablation-server")
    with postgres_database() as backend, mlflow_server(tmp, backend) as server:
        env = {**env, "MLFLOW_TRACKING_URI": server}
        # as `.venv/bin/cmt-bench ablation run` from a shell without the environment on PATH: the queued
        # stages' `python -m cmt_bench` must still find it
        bin_dir = str(Path(sys.executable).parent)
        bare = {**env, "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != bin_dir)}
        log = sh(f"{sys.executable} -m cmt_bench ablation run steps -j 2", repo, bare)
        assert "report in reports/ablations/steps" in log
        names = sh("dvc exp list --name-only", repo, env).split()
        assert sorted(names) == ["steps-2", "steps-8"]

        client = MlflowClient(server)
        exp = client.get_experiment_by_name("cmt_bench")
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate' and tags.init = 'cmt'")
        final = {(r.data.tags["dvc_exp_name"], int(r.data.tags["seed"])): r.data.metrics["fd_raw_2step_n1000"]
                 for r in runs}
        traj = {r.data.tags["dvc_exp_name"]: r.data.metrics["teacher_nfe"]
                for r in client.search_runs([exp.experiment_id], "tags.stage = 'trajectories'")}
    assert traj == {"steps-2": 512 * 2 * 2, "steps-8": 512 * 8 * 2}  # each level ran its own teacher
    # finished levels are kept; --force queues them again, to rerun every stage afresh
    assert "queued: nothing (every level exists)" in sh("python -m cmt_bench ablation queue steps", repo, env)
    assert "queued: steps-2, steps-8" in sh("python -m cmt_bench ablation queue steps --force", repo, env)
    assert sorted(re.findall(r"^\S+\s+(steps-\d)\s.*Queued", sh("dvc queue status", repo, env), re.M)) == ["steps-2", "steps-8"]
    sh("dvc queue remove --queued", repo, env)
    out = repo / "reports/ablations/steps"
    rows = pd.read_csv(out / "runs.csv")
    assert len(rows) == 4  # 2 levels x 2 seeds
    for _, row in rows.iterrows():
        assert row["metric"] == pytest.approx(final[f"steps-{int(row['level'])}", int(row["seed"])])
        assert 0 < row["posttrain_hours"] < row["total_hours"] and row["trajectories_hours"] > 0
        assert row["cmt_hours"] == pytest.approx(row["trajectories_hours"] + row["midtrain_hours"] + row["posttrain_hours"])
        assert row["total_hours"] == pytest.approx(row["cmt_hours"] + row["teacher_hours"])  # every stage CMT needs
    table = pd.read_csv(out / "table.csv", index_col="level")
    for level in (2, 8):  # the table is the seeds' mean and spread
        seeds = rows[rows.level == level]
        assert table.loc[level, "seeds"] == 2 and table.loc[level, "mean"] == pytest.approx(seeds["metric"].mean())
        assert table.loc[level, "sd"] == pytest.approx(seeds["metric"].std())
    report = (out / "report.md").read_text()
    assert "`trajectories.steps` = " in report and "| 2 | " in report and "| 8 | " in report
    assert (out / "ablation.png").stat().st_size > 10_000 and "data:image/png;base64," in (out / "report.html").read_text()
