"""Post-training as two DDP processes (torchrun, gloo on CPU) from the same entry point."""
import json

import pytest
import yaml
from conftest import make_repo, mlflow_runs, sh


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo, env = make_repo(tmp_path_factory.mktemp("ddp"), "smoke")
    sh("dvc repro pretrain", repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["compute"]["processes"] = 2
    (repo / "ddp.yaml").write_text(yaml.safe_dump(params))
    return repo, env


@pytest.mark.parametrize("method", ["meanflow", "ect"])
def test_two_processes_end_identical_in_one_run_and_the_ledger_counts_both(repo, method):
    """MeanFlow's JVP must not bypass DDP's gradient sync: both ranks end with the same weights
    (training checks a checksum across ranks and raises otherwise), rank 0 alone logs one run, and
    device-hours are wall time x 2."""
    repo, env = repo
    log = sh(f"python -m cmt_bench --params ddp.yaml posttrain --init diffusion --method {method}", repo, env)
    assert "torch.distributed" not in log or "Error" not in log
    client, runs = mlflow_runs(repo)
    cell = [r for r in runs if r.info.run_name == f"posttrain-{method}-diffusion-seed0"]
    assert len(cell) == 1, "one MLflow run for the two processes"
    run = cell[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["ranks_identical_weights"] == "true"
    assert run.data.metrics["images_seen"] == 8192  # the global batch: the same budget as one process
    ledger = json.loads((repo / f"artifacts/posttrain/{method}/diffusion/seed0/run.json").read_text())["ledger"]
    assert ledger["world_size"] == 2 and ledger["device_hours"] == pytest.approx(ledger["seconds"] * 2 / 3600)
    assert run.data.metrics["device_hours"] == pytest.approx(ledger["device_hours"])


def test_a_streamed_fid_split_over_two_processes_equals_one_process(repo):
    """evaluate.fid_samples: the sample set is the same for any number of processes (blocks seeded by
    their index), so two gloo processes give one process's Frechet distance up to summation order."""
    repo, env = repo
    if not (repo / "artifacts/posttrain/ect/diffusion/seed0/model.pt").exists():
        sh("python -m cmt_bench posttrain --init diffusion --method ect", repo, env)
    evaluations = lambda: [r for r in mlflow_runs(repo)[1] if r.data.tags.get("stage") == "evaluate"]  # noqa: E731
    metrics, before = {}, len(evaluations())
    for processes in (1, 2):
        params = yaml.safe_load((repo / "ddp.yaml").read_text())
        params["compute"]["processes"], params["evaluate"]["fid_samples"] = processes, 2500
        (repo / f"fid{processes}.yaml").write_text(yaml.safe_dump(params))
        sh(f"python -m cmt_bench --params fid{processes}.yaml evaluate --init diffusion --method ect", repo, env)
        metrics[processes] = json.loads((repo / "artifacts/evaluate/ect/diffusion/seed0/metrics.json").read_text())
    for k in ("fd_raw_1step_n2500", "fd_raw_2step_n2500"):
        assert metrics[1][k] > 0 and metrics[2][k] == pytest.approx(metrics[1][k], rel=1e-9, abs=0)
    assert metrics[1]["fd_raw_2step_n2500"] != metrics[1]["fd_raw_2step_n" + str(params["evaluate"]["samples"])]
    evaluated = evaluations()
    assert len(evaluated) == before + 2, "one MLflow run per evaluation, from rank 0 alone"
    assert sorted(r.data.tags["fid_processes"] for r in evaluated if "fid_processes" in r.data.tags) == ["1", "2"]
