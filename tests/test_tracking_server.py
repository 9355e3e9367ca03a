"""A real MLflow tracking server on 127.0.0.1 with a PostgreSQL backend is one setting away:
with MLFLOW_TRACKING_URI=http://... a stage's runs, metrics and artifacts go there, and no
SQLite file appears in the repo."""
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, mlflow_server, postgres_database
from mlflow.tracking import MlflowClient

PARAMS = {"preset": "server", "data": {"train_size": 2000, "heldout_size": 500},
          "net": {"hidden": 16, "depth": 1, "time_features": 8},
          "pretrain": {"train": {"batch_size": 128, "budget_images": 4096, "log_every_images": 1024,
                                 "checkpoint_every_images": 2048}},
          "trajectories": {"steps": 4}, "evaluate": {"inloop_samples": 200}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with postgres_database() as backend, mlflow_server(tmp, backend) as url:
        yield url


def test_stages_log_to_a_tracking_server(server, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true", "MLFLOW_TRACKING_URI": server}
    for stage in ("data", "pretrain"):
        out = subprocess.run([sys.executable, "-m", "cmt_bench", stage], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("cmt_bench")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pipeline", "data", "pretrain"}
    assert runs["pretrain"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    loss = client.get_metric_history(runs["pretrain"].info.run_id, "loss")
    assert [m.step for m in loss] == [8, 16, 24, 32]  # 4096 images in batches of 128, a point per 1024
    assert client.get_metric_history(runs["pretrain"].info.run_id, "device_hours")[-1].value > 0
    artifacts = [a.path for a in client.list_artifacts(runs["data"].info.run_id)]
    assert artifacts == ["manifest.json"]  # uploaded through the server, not written beside the repo


REPORT_PARAMS = {"preset": "server-report", "data": {"train_size": 2000, "heldout_size": 500},
                 "net": {"hidden": 16, "depth": 1, "time_features": 8},
                 "pretrain": {"train": {"batch_size": 128, "budget_images": 1024, "log_every_images": 512,
                                        "checkpoint_every_images": 1024}},
                 "midtrain": {"train": {"batch_size": 128, "budget_images": 512, "log_every_images": 256,
                                        "checkpoint_every_images": 512}},
                 "posttrain": {"methods": ["ect"], "seeds": [0, 1],
                               "train": {"batch_size": 128, "budget_images": 1024, "log_every_images": 256,
                                         "checkpoint_every_images": 1024}},
                 "trajectories": {"count": 256, "steps": 4}, "evaluate": {"samples": 300, "inloop_samples": 200}}


def test_report_reads_what_the_server_holds(server, tmp_path):
    """Every number of the report comes from the tracking server: the final metrics in finals.csv
    are the evaluate runs' metrics there, and its curves are the post-training runs' histories. A
    store that lacks the runs is refused by name."""
    import pandas as pd
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(REPORT_PARAMS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true", "MLFLOW_TRACKING_URI": server}
    cells = [[stage, "--init", init, "--method", "ect", "--seed", seed] for stage in ("posttrain", "evaluate")
             for init in ("random", "diffusion", "cmt") for seed in ("0", "1")]
    for argv in (["data"], ["features"], ["pretrain"], ["trajectories"], ["midtrain", "--method", "ect"], *cells,
                 ["report"]):
        out = subprocess.run([sys.executable, "-m", "cmt_bench", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{argv}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert not (tmp_path / "mlflow.db").exists()

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("cmt_bench")
    runs = client.search_runs([exp.experiment_id], "tags.preset = 'server-report'")
    evaluated = {(r.data.tags["init"], int(r.data.tags["seed"])): r for r in runs if r.data.tags["stage"] == "evaluate"}
    finals = pd.read_csv(tmp_path / "reports/server-report/finals.csv")
    assert len(finals) == 6 == len(evaluated)
    for _, row in finals.iterrows():
        assert row["eval_fd_raw_2step"] == evaluated[row["init"], row["seed"]].data.metrics["fd_raw_2step_n300"]
    posttrained = {(r.data.tags["init"], r.data.tags["seed"]): r.info.run_id
                   for r in runs if r.data.tags["stage"] == "posttrain"}
    curve = pd.read_csv(tmp_path / "reports/server-report/curves/ect.csv")
    for init in ("random", "diffusion", "cmt"):
        per_seed = [[m.value for m in sorted(client.get_metric_history(posttrained[init, s], "fd_raw_2step_n200"),
                                             key=lambda m: m.step)] for s in ("0", "1")]
        assert curve[init].tolist() == pytest.approx([(a + b) / 2 for a, b in zip(*per_seed)])

    other = subprocess.run([sys.executable, "-m", "cmt_bench", "report"], cwd=tmp_path, capture_output=True, text=True,
                           env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"})
    assert other.returncode == 1 and "of the tracking store" in other.stderr and "Traceback" not in other.stderr
