"""Study specs are refused before any trial runs, naming the key; the shipped specs are valid."""
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, SHIPPED_SPECS, shipped_spec

from cmt_bench.config import ParamsError, flatten, override, preset
from cmt_bench.study_spec import load_spec, trial_params

SMOKE = {"preset": "smoke", "method": "ect", "trials": 3, "objective": {"budget_images": 4096},
         "space": {"posttrain.train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}


def _spec(tmp_path, **changes):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, **changes}))
    return path


@pytest.mark.parametrize("name", SHIPPED_SPECS)
def test_shipped_specs_fit_their_presets(name):
    params, spec = shipped_spec(name)
    assert spec.name == name and spec.trials >= 5 and spec.space
    assert set(spec.space) <= set(flatten(params))


def test_a_method_the_pipeline_does_not_post_train_is_refused(tmp_path):
    params = override(preset("smoke", ROOT), {"posttrain.methods": ["ect"]}, "test")
    with pytest.raises(ParamsError, match=r"method: 'meanflow' is not post-trained by this pipeline; "
                                          r"posttrain.methods holds ect"):
        load_spec(str(_spec(tmp_path, method="meanflow", space={"posttrain.meanflow.r_neq_t": {"low": 0.1, "high": 0.9}})),
                  params, ROOT)


def test_trial_params_apply_values_and_budget():
    params = preset("smoke", ROOT)
    spec = load_spec(str(_spec_file(ROOT)), params, ROOT)
    p = trial_params(params, spec, {"posttrain.train.lr": 0.003, "posttrain.train.batch_size": 128})
    assert p.posttrain.train.lr == 0.003 and p.posttrain.train.batch_size == 128
    assert p.posttrain.train.budget_images == spec.objective.budget_images
    assert p.pretrain == params.pretrain  # upstream untouched


def _spec_file(root):
    return root / "experiments/studies/smoke_ect.yaml"


@pytest.mark.parametrize("changes, message", [
    ({"space": {"pretrain.train.lr": {"low": 1e-4, "high": 1e-2}}},
     "space.pretrain.train.lr: not a tunable parameter; allowed: posttrain.distance.huber_c"),
    ({"space": {"posttrain.train.lr": {"low": 1e-2, "high": 1e-4}}}, "low (0.01) must be below high"),
    ({"space": {"posttrain.train.batch_size": {"choices": [0, 128]}}},
     "space.posttrain.train.batch_size: value 0 is invalid"),
    ({"space": {"posttrain.train.batch_size": {"choices": [8192, 128]}}},
     "space.posttrain.train.batch_size: value 8192 is invalid: posttrain.train.budget_images: Value error, smaller "
     "than batch_size (8192)"),
    ({"space": {"posttrain.train.batch_size": {"low": 128.5, "high": 512, "int": True}}},
     "an int range needs whole low and high"),
    ({"preset": "toy"}, "preset: the study is for preset 'toy', params.yaml holds 'smoke'"),
    ({"objective": {"budget_images": 4096, "metric": "fid_inception_2step"}},
     "objective.metric: 'fid_inception_2step' is not measured for this preset; allowed: auto, fd_raw_1step"),
    ({"method": "gan"}, "method: Input should be 'ect', 'meanflow', "),  # every registered method follows
    ({"trials": 0}, "trials: Input should be greater than 0"),
    ({"pruner": {"kind": "hyperband"}}, "pruner.kind: Input should be 'none', 'median' or 'successive_halving'"),
    ({"sampler": "grid"}, "sampler: Input should be 'random', 'tpe' or 'qmc'"),
    ({"inits": ["cmt", "cmt"]}, "inits: list each at most once"),
])
def test_bad_specs_are_refused_by_key(tmp_path, changes, message):
    with pytest.raises(ParamsError) as err:
        load_spec(str(_spec(tmp_path, **changes)), preset("smoke", ROOT), ROOT)
    assert message in str(err.value)


def test_cli_refuses_a_bad_spec_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("preset: toy", "preset: smoke"))
    spec = _spec(tmp_path, space={"posttrain.ect.q": {"low": 0.5, "high": 8.0}})
    out = subprocess.run([sys.executable, "-m", "cmt_bench", "study", "run", str(spec)], cwd=tmp_path,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "space.posttrain.ect.q: value 0.5 is invalid" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "optuna.db").exists()
    missing = subprocess.run([sys.executable, "-m", "cmt_bench", "study", "run", "nope"], cwd=tmp_path,
                             capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "study spec 'nope' not found" in missing.stderr
