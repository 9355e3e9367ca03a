"""A teacher from a file in a real `dvc repro` (pretrain.source import): a small diffusers UNet made
and saved here stands in for a pre-trained checkpoint; every later stage trains and samples its
architecture through teacher_conversion, and no teacher is trained."""
import json
import os
import subprocess
import sys

import diffusers
import pytest
import torch
from conftest import ROOT, make_repo, mlflow_runs, sh

from cmt_bench import config, preflight
from cmt_bench import data as datasets
from cmt_bench.stages.midtrain import on_the_fly
from cmt_bench.stages.trajectories import teacher_velocity
from cmt_bench.train import generator
from cmt_bench.nets import load_teacher_into
from cmt_bench.stages.common import seeded_net
from cmt_bench.teacher_import import network


def _teacher(folder):
    """A UNet2DModel with every weight moved off its initial value, as training would move it."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(folder)
    return folder


def _train(images: int, batch: int = 32) -> dict:
    return {"train": {"budget_images": images, "batch_size": batch, "log_every_images": images // 2,
                      "checkpoint_every_images": images // 2}}


def _teacher_params(folder, **extra) -> dict:
    return {"source": "import", "teacher": {"path": str(folder), "prediction": "eps", "schedule": "vp_ddpm", **extra}}


def test_an_imported_teacher_runs_every_stage_for_three_inits_and_two_methods(tmp_path, monkeypatch):
    folder = _teacher(tmp_path / "teacher")
    repo, env = make_repo(tmp_path / "repo", "digits", {
        "pretrain": _teacher_params(folder, declared_device_hours=7.0), "midtrain": _train(64),
        "posttrain": {**_train(64), "seeds": [0]}, "trajectories": {"count": 32, "steps": 4},
        "evaluate": {"samples": 100, "inloop_samples": 50}, "studies": {"specs": []}})
    sh("dvc repro", repo, env)
    _, runs = mlflow_runs(repo)
    teacher = next(r for r in runs if r.data.tags.get("stage") == "pretrain")
    assert teacher.data.tags["teacher_source"] == "import" and teacher.data.tags["declared_device_hours"] == "7.0"
    assert teacher.data.metrics["images_seen"] == 0 and teacher.data.metrics["device_hours"] == 0
    assert teacher.data.metrics["fd_digits_ode_n50"] > 0  # scored as a trained teacher is
    assert len(teacher.data.tags["teacher_sha256"]) == 64
    # the file's weights are what the pipeline saved as its teacher
    saved = torch.load(repo / "artifacts/pretrain/model.pt", weights_only=True)["ema"]
    unet = diffusers.UNet2DModel.from_pretrained(folder)
    assert all(torch.equal(saved[f"net.net.unet.{k}"], v) for k, v in unet.state_dict().items())
    post = [r for r in runs if r.data.tags.get("stage") == "posttrain"]
    assert sorted((r.data.tags["method"], r.data.tags["init"]) for r in post) == \
        [(m, i) for m in ("ect", "meanflow") for i in ("cmt", "diffusion", "random")]
    assert all(r.info.status == "FINISHED" and r.data.metrics["images_seen"] == 64 for r in post)
    evaluated = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert len(evaluated) == 6 and all(r.data.metrics["fd_digits_2step_n100"] > 0 for r in evaluated)
    traj = json.loads((repo / "artifacts/trajectories/run.json").read_text())["ledger"]
    assert traj["teacher_nfe"] == 32 * 8  # the imported teacher drew them: Heun, 4 steps of 2 evaluations
    report = (repo / "reports/digits/report.md").read_text()
    assert "The teacher was imported from a file" in report and "declared, not measured" in report

    # trajectories on the fly: the draw mid-training makes from the stored stage's noise gives its
    # stored trajectories, bit for bit (one chunk: count <= trajectories.batch_size)
    monkeypatch.chdir(repo)
    params = config.load("params.yaml")
    manifest = json.loads((repo / "artifacts/trajectories/manifest.json").read_text())
    stored = datasets.read_shards(repo / "artifacts/trajectories", "traj", manifest["traj"])
    teacher = teacher_velocity(params, (1, 8, 8), torch.device("cpu"))
    draw = on_the_fly(teacher, (1, 8, 8), torch.tensor(manifest["times"]), manifest["solver"])
    assert torch.equal(draw(32, generator(params.seed, "trajectories"), torch.device("cpu")), stored)
    # and mid-training in that mode: the teacher's evaluations are in its ledger, nothing is stored
    sh("""python -c "import yaml; p = yaml.safe_load(open('params.yaml')); p['trajectories']['mode'] = 'on_the_fly'; \
yaml.safe_dump(p, open('params.yaml', 'w'), sort_keys=False)" && dvc repro midtrain@ect midtrain@meanflow""", repo, env)
    assert not list((repo / "artifacts/trajectories").glob("*.tar"))
    _, runs = mlflow_runs(repo)
    mid = [r for r in runs if r.data.tags.get("stage") == "midtrain" and r.data.params.get("trajectories_mode") == "on_the_fly"]
    assert len(mid) == 2 and all(r.data.metrics["teacher_nfe"] == 8 * 64 for r in mid)


def test_the_random_init_redraws_every_weight_and_the_diffusion_init_is_the_teacher(tmp_path):
    """The random init is the teacher's architecture with fresh weights (none left pre-trained); the
    diffusion init is the teacher's velocity at start for every target time."""
    folder = _teacher(tmp_path / "teacher")
    params = config.validate({**config.Params().model_dump(), "data": {"dataset": "digits"}, "net": {"kind": "unet"},
                              "pretrain": _teacher_params(folder)})
    teacher = network(params.pretrain.teacher, (1, 8, 8), two_times=False, weights=True)
    fresh = seeded_net(0, params, (1, 8, 8), True, "posttrain")
    pretrained = dict(teacher.named_parameters())
    assert not any(torch.equal(p, pretrained[k]) for k, p in fresh.named_parameters() if k in pretrained)
    load_teacher_into(fresh, teacher.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.4, 0.7, 0.95])
    with torch.no_grad():
        for s in (torch.zeros(4), t / 2, t):
            torch.testing.assert_close(fresh(x, t, s), teacher(x, t), rtol=0, atol=0)


def test_an_imported_teacher_that_does_not_fit_is_refused_by_name(tmp_path):
    folder = _teacher(tmp_path / "teacher")
    teacher = config.PretrainConfig(**_teacher_params(folder)).teacher
    with pytest.raises(ValueError, match=r"takes 1x8x8 images .* the data are 3x8x8"):
        network(teacher, (3, 8, 8), two_times=True)
    params = config.validate({**config.Params().model_dump(), "pretrain": {"source": "import"}})
    with pytest.raises(config.ParamsError, match="pretrain.teacher.path: pretrain.source 'import' needs"):
        preflight.check(params, "params.yaml")
    params = config.validate({**config.Params().model_dump(), "pretrain": _teacher_params(tmp_path / "nowhere")})
    with pytest.raises(config.ParamsError, match="no diffusers model folder at .*nowhere"):
        preflight.check(params, "params.yaml")
    with pytest.raises(ValueError, match="schedule_args: beta_max not a constant of schedule 'vp_ddpm'; "
                                         "allowed: beta_start, beta_end, steps"):
        config.PretrainConfig(**_teacher_params(folder, schedule_args={"beta_max": 0.02}))


def test_plan_times_stand_ins_for_a_teacher_and_data_not_on_this_machine(tmp_path):
    """`cmt-bench plan --shape --stand-in-teacher`: the imported teacher's architecture from a folder
    with only config.json, random samples for the data; no pre-training or stored-trajectory cost
    (imported teacher, trajectories on the fly), mid-training timed with its per-batch trajectories."""
    folder = _teacher(tmp_path / "teacher")
    (tmp_path / "architecture").mkdir()
    (tmp_path / "architecture/config.json").write_text((folder / "config.json").read_text())
    raw = config.preset("digits").model_dump()
    raw = config.deep_merge(raw, {"pretrain": {"source": "import", "teacher": {  # an EDM entry point's embedding
                                      "path": None, "format": "entrypoint", "time_embedding": "net.model.map_layer1"}},
                                  "trajectories": {"mode": "on_the_fly", "steps": 2, "solver": "euler"},
                                  "midtrain": _train(64), "posttrain": {**_train(64), "seeds": [0]},
                                  "data": {"path": "/nowhere"}, "studies": {"specs": []}})
    (tmp_path / "params.yaml").write_text(config.to_yaml(config.validate(raw)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true"}
    out = subprocess.run([sys.executable, "-m", "cmt_bench", "plan", "--steps", "2", "--shape", "1,8,8", "--batch", "8",
                          "--stand-in-teacher", str(tmp_path / "architecture")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("pretrain (imported teacher)") and "not trained here" in line for line in lines)
    assert not any(line.startswith("trajectories ") for line in lines)
    mid = [line for line in lines if line.startswith("midtrain for")]
    assert len(mid) == 2 and all("with the teacher's trajectories for its batch" in line for line in mid)
    assert "Timed on stand-ins: random samples of shape 1,8,8" in out.stdout and "architecture" in out.stdout
    assert "at batch 8, scaled linearly to the stage's batch" in out.stdout  # --batch: steps of 32 timed at 8
    timed = [line for line in out.stderr.splitlines() if line.startswith("timed ")]  # progress, a line per stage
    assert [line.split(":")[0] for line in timed] == ["timed " + line.split("  ")[0] for line in lines
                                                      if line.startswith(("midtrain for", "posttrain"))], out.stderr
    bad = subprocess.run([sys.executable, "-m", "cmt_bench", "plan", "--shape", "1,x"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--shape: positive integers" in bad.stderr
