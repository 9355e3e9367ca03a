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
