"""Real `dvc repro` runs of the image presets in temporary repos, with tiny budgets."""
import json

from conftest import make_repo, mlflow_runs, require_fashion, sh
from cmt_bench import linear

TINY_NET = {"channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "time_features": 8}


def _train(images: int, batch: int = 32) -> dict:
    return {"train": {"budget_images": images, "batch_size": batch, "log_every_images": images // 2,
                      "checkpoint_every_images": images // 2}}


def test_digits_repro_runs_every_stage_for_three_inits_and_two_methods(tmp_path):
    repo, env = make_repo(tmp_path, "digits", {
        "net": TINY_NET, "pretrain": _train(256), "midtrain": _train(128), "posttrain": {**_train(128), "seeds": [0]},
        "trajectories": {"count": 64, "steps": 4}, "evaluate": {"samples": 200, "inloop_samples": 100},
        "studies": {"specs": []}})  # the preset's 60-trial study is not this test's (test_study* cover studies)
    sh("dvc repro", repo, env)
    manifest = json.loads((repo / "artifacts/data/manifest.json").read_text())
    assert manifest["dtype"] == "uint8" and manifest["shape"] == [1, 8, 8]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["heldout"]["count"] == 1797
    client, runs = mlflow_runs(repo)
    post = [r for r in runs if r.data.tags.get("stage") == "posttrain"]
    assert sorted((r.data.tags["method"], r.data.tags["init"]) for r in post) == \
        [(m, i) for m in ("ect", "meanflow") for i in ("cmt", "diffusion", "random")]
    assert all(r.info.status == "FINISHED" and r.data.metrics["images_seen"] == 128 for r in post)
    mid = {r.data.tags["method"] for r in runs if r.data.tags.get("stage") == "midtrain"}
    assert mid == {"cmt_cm", "cmt_mf"}  # CMT-CM for ECT, CMT-MF for MeanFlow
    features = next(r for r in runs if r.data.tags.get("stage") == "features")
    assert features.data.metrics["heldout_accuracy"] > 0.9  # the fd_digits classifier, trained in the pipeline
    for r in post:  # in-loop fd_digits through torch-fidelity, 1- and 2-step, named with the sample count
        for key in ("fd_digits_1step_n100", "fd_digits_2step_n100", "sw_2step_n100"):
            assert len(client.get_metric_history(r.info.run_id, key)) == 3
    evaluated = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert all(r.data.metrics["fd_digits_2step_n200"] > 0 for r in evaluated) and len(evaluated) == 6
    assert list((repo / "artifacts/features/reference").glob("heldout-*-stat-fid-*.pt"))  # cached once, a DVC output
    report = (repo / "reports/digits/report.md").read_text()
    assert "1x8x8 images" in report and "UNet" in report and "held-out accuracy" in report
    assert "`fd_digits_2step`" in report
    assert (repo / "reports/digits/samples.png").stat().st_size > 10_000


def test_fashion_preset_runs_its_first_stages(tmp_path):
    require_fashion()
    repo, env = make_repo(tmp_path, "fashion", {
        "data": {"train_size": 512, "heldout_size": 256}, "net": {**TINY_NET, "blocks_per_level": 1},
        "pretrain": _train(64, 16), "evaluate": {"inloop_samples": 16}})
    sh("dvc repro pretrain", repo, env)
    manifest = json.loads((repo / "artifacts/data/manifest.json").read_text())
    assert manifest["shape"] == [1, 32, 32] and manifest["splits"]["train"]["count"] == 512
    _, runs = mlflow_runs(repo)
    pretrain = next(r for r in runs if r.data.tags.get("stage") == "pretrain")
    assert pretrain.info.status == "FINISHED" and pretrain.data.metrics["images_seen"] == 64
    assert pretrain.data.tags["precision"] == "fp32"  # the preset asks for bf16, which is for CUDA: a CPU stays fp32
    assert pretrain.data.tags["matmul"] == linear.resolve("auto")  # the route compute.matmul auto took here
