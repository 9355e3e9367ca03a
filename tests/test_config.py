"""params.yaml validation: bad files are refused with the offending dotted key and what is allowed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmt_bench import config
from cmt_bench.config import ParamsError

REPO = Path(__file__).parents[1]
TOP_KEYS = "data, evaluate, midtrain, net, posttrain, preset, pretrain, report, sampling, seed, studies, tracking, trajectories"
TRAIN_KEYS = "batch_size, budget_images, checkpoint_every_images, ema_decay, log_every_images, lr"

# (YAML text, substrings the error message must contain)
BAD = {
    "misspelt_section": ("pretrian:\n  train: {lr: 0.1}\n", ["pretrian", "unknown key", TOP_KEYS]),
    "misspelt_nested_key": ("pretrain:\n  train: {batchsize: 64}\n", ["pretrain.train.batchsize", "unknown key", TRAIN_KEYS]),
    "unknown_ect_key": ("posttrain:\n  ect: {qq: 3}\n", ["posttrain.ect.qq", "unknown key", "b, k, q, stage_images, t_sampling"]),
    "dataset": ("data: {dataset: mnist}\n", ["data.dataset", "'checkerboard'", "'eight_gaussians'", "'two_moons'", "'mnist'"]),
    "solver": ("trajectories: {solver: rk4}\n", ["trajectories.solver", "'euler'", "'heun'"]),
    "grid": ("trajectories: {grid: log}\n", ["trajectories.grid", "'uniform'", "'edm'"]),
    "distance_kind": ("posttrain:\n  distance: {kind: l1}\n", ["posttrain.distance.kind", "'l2'", "'pseudo_huber'"]),
    "batch_size_zero": ("pretrain:\n  train: {batch_size: 0}\n", ["pretrain.train.batch_size", "greater than 0"]),
    "batch_size_negative": ("midtrain:\n  train: {batch_size: -8}\n", ["midtrain.train.batch_size", "greater than 0"]),
    "lr_not_a_number": ("pretrain:\n  train: {lr: fast}\n", ["pretrain.train.lr", "valid number", "'fast'"]),
    "ema_decay_one": ("midtrain:\n  train: {ema_decay: 1.0}\n", ["midtrain.train.ema_decay", "less than 1"]),
    "t_mid_zero": ("sampling: {t_mid: 0}\n", ["sampling.t_mid", "greater than 0"]),
    "t_mid_above_one": ("sampling: {t_mid: 1.5}\n", ["sampling.t_mid", "less than 1"]),
    "metric": ("report: {metric: fid}\n", ["report.metric", "'fid' is not measured", "auto, fd_raw_1step, "
                                                                                     "fd_raw_2step, sw_1step, sw_2step"]),
    "metric_of_other_features": ("report: {metric: fd_digits_2step}\n", ["report.metric", "auto, fd_raw_1step"]),
    "seeds_repeated": ("posttrain: {seeds: [0, 0]}\n", ["posttrain.seeds", "at most once"]),
    "seeds_negative": ("posttrain: {seeds: [-1]}\n", ["posttrain.seeds.0", "greater than or equal to 0"]),
    "classifier_for_points": ("evaluate: {features: classifier}\n", ["evaluate.features", "needs labelled images",
                                                                     "'raw'"]),
    "inception_without_weights": ("data: {dataset: digits}\nnet: {kind: unet}\nevaluate: {features: inception}\n",
                                  ["evaluate.inception_weights", "never downloaded"]),
    "features_value": ("evaluate: {features: clip}\n", ["evaluate.features", "'auto'", "'raw'", "'classifier'",
                                                         "'inception'"]),
    "budget_below_batch": ("posttrain:\n  train: {budget_images: 100, batch_size: 512}\n",
                           ["posttrain.train.budget_images", "got 100", "batch_size (512)"]),
    "ect_q_one": ("posttrain:\n  ect: {q: 1}\n", ["posttrain.ect.q", "greater than 1"]),
    "section_not_mapping": ("net: 5\n", ["net:", "must be a mapping", "got 5"]),
    "empty_section": ("pretrain:\n", ["pretrain:", "section is empty"]),
    "bool_for_int": ("pretrain:\n  train: {batch_size: true}\n", ["pretrain.train.batch_size", "valid integer"]),
    "empty_file": ("# nothing here\n", ["file is empty", "pretrain"]),
    "list_not_mapping": ("- pretrain\n- midtrain\n", ["expected a mapping of sections", "list"]),
    "invalid_yaml": ("pretrain: {train: [\n", ["not valid YAML"]),
    "net_for_images": ("data: {dataset: digits}\n", ["net.kind", "'mlp' does not fit", "use unet for images"]),
    "variant_missing": ("midtrain:\n  variants: {ect: cm}\n", ["midtrain.variants", "meanflow"]),
    "variant_value": ("midtrain:\n  variants: {ect: cd}\n", ["midtrain.variants.ect", "'cm'", "'mf'"]),
    "precision": ("compute: {precision: fp16}\n", ["compute.precision", "'fp32'", "'bf16'"]),
    "compile": ("compute: {compile: full}\n", ["compute.compile", "'none'", "'step'", "'jvp'"]),
    "draws": ("compute: {draws: gpu}\n", ["compute.draws", "'device'", "'host'"]),
    "matmul": ("compute: {matmul: blas}\n", ["compute.matmul", "'auto'", "'torch'", "'onednn'"]),
    "channels_last_for_points": ("compute: {channels_last: true}\n", ["compute.channels_last", "net.kind is 'mlp'"]),
    "no_levels": ("net: {kind: unet, channel_mult: []}\n", ["net.channel_mult", "at least one level"]),
}


@pytest.mark.parametrize("text, expected", BAD.values(), ids=BAD.keys())
def test_bad_params_refused_with_key_and_allowed(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as exc:
        config.load(path)
    msg = str(exc.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, f"{part!r} missing from:\n{msg}"


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="no such parameter file"):
        config.load(tmp_path / "nope.yaml")


def test_all_errors_reported_at_once(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: {dataset: mnist}\npretrain:\n  train: {batchsize: 64, lr: -1}\n")
    with pytest.raises(ParamsError) as exc:
        config.load(path)
    msg = str(exc.value)
    assert "3 invalid parameter(s)" in msg
    for key in ("data.dataset", "pretrain.train.batchsize", "pretrain.train.lr"):
        assert key in msg


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-3` as a string; it must still be accepted as a float.
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  train: {lr: 1e-3}\n")
    assert config.load(path).pretrain.train.lr == pytest.approx(1e-3)


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "cmt_bench", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_before_any_work(tmp_path):
    (tmp_path / "bad.yaml").write_text("posttrain:\n  distance: {kind: l1}\n")
    result = _cli(tmp_path, "--params", "bad.yaml", "pretrain")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "posttrain.distance.kind" in result.stderr and "'pseudo_huber'" in result.stderr
    for made in ("artifacts", "checkpoints", "mlflow.db", "mlruns"):
        assert not (tmp_path / made).exists()


def test_cli_check_accepts_good_file(tmp_path):
    (tmp_path / "good.yaml").write_text((REPO / "params.yaml").read_text())
    result = _cli(tmp_path, "--params", "good.yaml", "check")
    assert result.returncode == 2 and "study spec 'toy_ect' not found" in result.stderr  # check reads the specs too
    shutil.copytree(REPO / "experiments", tmp_path / "experiments")
    result = _cli(tmp_path, "--params", "good.yaml", "check")
    assert result.returncode == 0, result.stderr
    assert "valid (preset toy)" in result.stdout


def test_cli_refuses_cuda_where_there_is_none(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "gpu.yaml").write_text("compute: {device: cuda}\n")
    result = _cli(tmp_path, "--params", "gpu.yaml", "pretrain")
    assert result.returncode == 2 and "compute.device: 'cuda'" in result.stderr and "auto, cpu" in result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_cli_refuses_missing_inception_weights_before_any_work(tmp_path):
    (tmp_path / "fid.yaml").write_text("data: {dataset: digits}\nnet: {kind: unet}\n"
                                       "evaluate: {features: inception, inception_weights: /nowhere/pt_inception.pth}\n")
    result = _cli(tmp_path, "--params", "fid.yaml", "evaluate", "--init", "cmt", "--method", "ect")
    assert result.returncode == 2
    assert "evaluate.inception_weights" in result.stderr and "never downloaded" in result.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()


def test_params_yaml_is_exactly_the_toy_preset():
    assert (REPO / "params.yaml").read_text() == config.to_yaml(config.preset("toy", root=REPO))
    assert config.load(REPO / "params.yaml") == config.preset("toy", root=REPO)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
def test_every_preset_validates(name):
    params = config.preset(name, root=REPO)
    assert params.preset == name


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ParamsError) as exc:
        config.preset("huge", root=REPO)
    msg = str(exc.value)
    assert "'huge'" in msg and "smoke" in msg and "toy" in msg


def test_fingerprint_stable_and_sensitive():
    a, b = config.preset("toy", root=REPO), config.preset("toy", root=REPO)
    assert config.fingerprint(a) == config.fingerprint(b)
    assert config.fingerprint(a.pretrain, "x") == config.fingerprint(b.pretrain, "x")
    raw = a.model_dump()
    raw["posttrain"]["ect"]["q"] = 3.0
    changed = config.validate(raw)
    assert config.fingerprint(changed) != config.fingerprint(a)
    assert config.fingerprint(changed.pretrain) == config.fingerprint(a.pretrain)
    assert config.fingerprint(a.pretrain, "x") != config.fingerprint(a.pretrain, "y")


def test_verdict_thresholds_are_validated_parameters():
    """The report's rules live under report: and a bad threshold is refused with its key."""
    params = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    assert (params.report.floor_margin, params.report.time_tie, params.report.within_best) == (1.25, 0.10, 0.10)
    with pytest.raises(ParamsError, match=r"report\.time_tie: Input should be less than 1"):
        config.override(params, {"report.time_tie": 1.5}, "test")
    with pytest.raises(ParamsError, match=r"report\.min_trials"):
        config.override(params, {"report.min_trials": 0}, "test")
