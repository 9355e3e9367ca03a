"""Resume after SIGKILL equals an uninterrupted run; NaN stops loudly and keeps the last checkpoint;
counted FLOPs match a hand count and their probes leave training untouched."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

from cmt_bench import checkpoint, config, nets, train as training
from cmt_bench.ledger import Ledger, count_flops
from cmt_bench.tracking import Tracker
from cmt_bench.train import Job, NonFiniteLoss, train

# long enough (about 2,000 steps) that a kill lands mid-run; logs and checkpoints every few hundred
RESUME_PARAMS = {
    "preset": "resume", "data": {"train_size": 2000, "heldout_size": 500},
    "net": {"hidden": 32, "depth": 1, "time_features": 16},
    "pretrain": {"train": {"batch_size": 64, "budget_images": 128_000, "log_every_images": 12_800,
                           "checkpoint_every_images": 19_200}, "ode_eval": {"steps": 4}},
    "evaluate": {"inloop_samples": 200},
}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "CI": "true", "MLFLOW_TRACKING_URI": ""}


def _stage(cwd, stage):
    return subprocess.Popen([sys.executable, "-m", "cmt_bench", stage], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _history(workdir):
    run_id = yaml.safe_load((workdir / "artifacts/pretrain/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    keys = ("loss", "fd_raw_ode_n200", "sw_ode_n200", "images_seen", "step", "flops")
    return run_id, client, {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "uninterrupted", tmp_path / "killed"
    for d in (a, b):
        d.mkdir()
        (d / "params.yaml").write_text(yaml.safe_dump(RESUME_PARAMS))
    assert _stage(a, "data").wait() == 0
    shutil.copytree(a / "artifacts", b / "artifacts")
    assert _stage(a, "pretrain").wait() == 0

    proc, ckpt = _stage(b, "pretrain"), b / "checkpoints/pretrain/last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.load(ckpt)
    assert 0 < killed_at["step"] < 2000
    out = _stage(b, "pretrain")
    log = out.communicate()[0]
    assert out.returncode == 0, log
    assert f"resuming from checkpoints/pretrain/last.pt at step {killed_at['step']}" in log

    wa = torch.load(a / "artifacts/pretrain/model.pt", weights_only=True)
    wb = torch.load(b / "artifacts/pretrain/model.pt", weights_only=True)
    for part in ("net", "ema"):
        assert wa[part].keys() == wb[part].keys()
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part

    _, _, hist_a = _history(a)
    run_b, client_b, hist_b = _history(b)
    assert run_b == killed_at["run_id"]  # resumed into the same MLflow run
    assert client_b.get_run(run_b).info.status == "FINISHED"
    for key in hist_a:
        steps = [s for s, _ in hist_b[key]]
        assert len(steps) == len(set(steps)), f"{key}: a step was logged twice"
        assert hist_a[key] == hist_b[key], key
    assert len(hist_a["loss"]) > 5
    assert not ckpt.exists()  # a finished stage drops its resumable state


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = config.Params(tracking=config.TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    return params, MlflowClient(params.tracking.uri)


def _toy_job(nan_at_step=None):
    data = torch.randn(256, 2)

    def loss(net, x, gen, seen):
        out = net(x, torch.rand(len(x), generator=gen)).pow(2).mean()
        return out * float("nan") if nan_at_step is not None and seen >= nan_at_step * 32 else out
    return Job("toy", data=data, loss=loss)


def _run(params, job, ckpt, fp="fp", budget=320):
    cfg = config.TrainConfig(batch_size=32, budget_images=budget, log_every_images=64, checkpoint_every_images=64)
    torch.manual_seed(0)
    net = nets.build((2,), config.NetConfig(hidden=16, depth=1, time_features=8), two_times=False)
    return train(net, job, cfg, seed=0, ckpt_path=ckpt, fingerprint=fp, ledger=Ledger(device="cpu"),
                 open_tracker=lambda run_id: Tracker.open(params, "toy", run_id=run_id))


def test_nan_stops_loudly_and_keeps_last_good_checkpoint(tracked, tmp_path):
    params, client = tracked
    ckpt = tmp_path / "ckpt/last.pt"
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 6 .*last good checkpoint is kept"):
        _run(params, _toy_job(nan_at_step=5), ckpt)
    state = checkpoint.load(ckpt)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["net"].values())
    run = client.get_run(state["run_id"])
    assert run.info.status == "FAILED" and "nan" in run.data.tags["failure"]


def test_checkpoint_of_other_params_is_not_resumed(tracked, tmp_path, capsys):
    params, _ = tracked
    ckpt = tmp_path / "ckpt/last.pt"
    first, tracker = _run(params, _toy_job(), ckpt, fp="a")
    tracker.finish()
    again, _ = _run(params, _toy_job(), ckpt, fp="a")  # same inputs: already done, nothing to redo
    assert again.history == [] and "resuming" in capsys.readouterr().err
    other, _ = _run(params, _toy_job(), ckpt, fp="b")
    assert len(other.history) == len(first.history) and "starting afresh" in capsys.readouterr().err


def test_an_evaluation_beside_the_steps_logs_what_one_between_them_logs(tracked, tmp_path):
    """Job.evaluate_beside (the teacher's stage, which runs alone) evaluates on another thread while the
    steps go on: the same points with the same values in the history and in MLflow, the same weights."""
    params, client = tracked
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a core beside the steps' thread")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    threads, runs = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # one thread for the steps, as compute.threads 1: a core to spare
    try:
        for beside in (False, True):
            on_main = set()

            def evaluate(ema):
                on_main.add(threading.current_thread() is threading.main_thread())
                with torch.no_grad():
                    return {"score": float(ema(noise, torch.full((64,), 0.5)).pow(2).mean())}
            torch.manual_seed(0)  # the job's data
            job = _toy_job()
            job.evaluate, job.evaluate_beside = evaluate, beside
            result, tracker = _run(params, job, tmp_path / f"beside_{beside}" / "last.pt")
            tracker.finish()
            runs[beside] = result, tracker.run_id, on_main
    finally:
        torch.set_num_threads(threads)
    (between, between_id, on_main_between), (beside, beside_id, on_main_beside) = runs[False], runs[True]
    assert on_main_between == {True} and on_main_beside == {False}
    untimed = lambda result: [{k: v for k, v in h.items() if k != "device_hours"} for h in result.history]  # noqa: E731
    assert len(between.history) == 6 and untimed(beside) == untimed(between)
    curve = lambda run_id: [(m.step, m.value) for m in client.get_metric_history(run_id, "score")]  # noqa: E731
    assert curve(beside_id) == curve(between_id) and len(curve(beside_id)) == 6
    assert all(torch.equal(a, b) for a, b in zip(between.ema.state_dict().values(), beside.ema.state_dict().values()))


def _linear_run(params, tmp_path, dropout: float):
    """5 steps of batch 32 on Linear(2, 16) [-> dropout] -> Linear(16, 3), squared output as the loss."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3))
    job = Job("lin", data=torch.randn(256, 2), loss=lambda net, x, gen, seen: net(x).pow(2).mean())
    cfg = config.TrainConfig(batch_size=32, budget_images=160, log_every_images=64, checkpoint_every_images=64)
    result, tracker = train(net, job, cfg, seed=0, ckpt_path=tmp_path / f"ckpt{dropout}/last.pt", fingerprint="fp",
                            ledger=Ledger(device="cpu"), open_tracker=lambda run_id: Tracker.open(params, "lin"))
    tracker.finish()
    return result


def test_counted_flops_match_a_hand_count(tracked, tmp_path):
    """Per step: forward 2 x B x (2 x 16 + 16 x 3) multiply-adds; backward the weight gradients of both
    layers (the same count) and the hidden activation's gradient (2 x B x 16 x 3); the input needs none."""
    params, client = tracked
    result = _linear_run(params, tmp_path, dropout=0.0)
    b = 32
    per_step = 2 * b * (2 * 16 + 16 * 3) * 2 + 2 * b * 16 * 3
    assert result.ledger.flops == 5 * per_step
    logged = [h["flops"] for h in result.history]
    assert logged[0] == 0 and logged[-1] == 5 * per_step


def test_flop_probes_leave_training_untouched(tracked, tmp_path, monkeypatch):
    """With dropout (the global random stream) the weights after training do not depend on how many
    probe steps were counted before it."""
    params, _ = tracked
    weights = []
    for probes in (1, 3):
        monkeypatch.setattr(training, "FLOP_PROBES", probes)
        weights.append(_linear_run(params, tmp_path / str(probes), dropout=0.5).net.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_job_drawing_on_the_fly_resumes_exactly_and_counts_its_teacher(tracked, tmp_path):
    """Trajectories drawn per batch (trajectories.mode on_the_fly): stopped after 4 of 10 steps and
    rerun, the weights and the teacher-evaluation count equal an uninterrupted run's."""
    from cmt_bench import losses
    from cmt_bench.solvers import time_grid
    from cmt_bench.stages.midtrain import on_the_fly
    params, _ = tracked
    torch.manual_seed(1)
    teacher = nets.build((2,), config.NetConfig(hidden=16, depth=1, time_features=8), two_times=False)
    times = time_grid(4, "uniform")
    job = Job("mid", data=None, loss=lambda n, x, g, seen: losses.cmt_mf_loss(n, x, times, g, config.Distance()),
              draw=on_the_fly(teacher, (2,), times, "heun"), teacher_nfe_per_example=8)

    def run(ckpt, budget):
        cfg = config.TrainConfig(batch_size=32, budget_images=budget, log_every_images=64, checkpoint_every_images=64)
        torch.manual_seed(0)
        net = nets.build((2,), config.NetConfig(hidden=16, depth=1, time_features=8), two_times=True)
        result, tracker = train(net, job, cfg, seed=0, ckpt_path=ckpt, fingerprint="fp", ledger=Ledger(device="cpu"),
                                open_tracker=lambda run_id: Tracker.open(params, "mid", run_id=run_id))
        tracker.finish()
        return result
    whole = run(tmp_path / "a/last.pt", 320)
    run(tmp_path / "b/last.pt", 128)
    resumed = run(tmp_path / "b/last.pt", 320)
    assert all(torch.equal(whole.net.state_dict()[k], v) for k, v in resumed.net.state_dict().items())
    assert whole.ledger.teacher_nfe == resumed.ledger.teacher_nfe == 8 * 320
    assert whole.history[-1]["teacher_nfe"] == 8 * 320
    # the draw's teacher evaluations (8 per example, 32 examples a step) are part of each step's counted FLOPs
    teacher_flops = count_flops(lambda: teacher(torch.zeros(32, 2), torch.full((32,), 0.5))) * 8
    assert whole.ledger.flops / 10 > teacher_flops > 0


def test_radam_with_linear_decay_resumes_exactly_and_ends_near_zero(tracked, tmp_path):
    """sony/cmt's optimizer (RAdam, lr decaying linearly to 0): the rate is a function of the step, so a
    run stopped at its second logged point (its last checkpoint at step 2 of 10) and rerun ends with an
    uninterrupted run's weights."""
    params, _ = tracked

    class Stop(Exception):
        pass

    def stop_at_128(seen, values):
        if seen == 128:
            raise Stop

    def run(ckpt, on_point=None):
        cfg = config.TrainConfig(batch_size=32, budget_images=320, log_every_images=64, checkpoint_every_images=64,
                                 optimizer="radam", lr_decay="linear", lr=0.01)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Linear(16, 3))
        job = Job("lin", data=torch.randn(256, 2, generator=torch.Generator().manual_seed(0)),
                  loss=lambda net, x, gen, seen: (net(x) - 1).pow(2).mean(), on_point=on_point)
        result, tracker = train(net, job, cfg, seed=0, ckpt_path=ckpt, fingerprint="fp", ledger=Ledger(device="cpu"),
                                open_tracker=lambda run_id: Tracker.open(params, "lin", run_id=run_id))
        tracker.finish()
        return result
    whole = run(tmp_path / "a/last.pt")
    with pytest.raises(Stop):
        run(tmp_path / "b/last.pt", stop_at_128)
    assert checkpoint.load(tmp_path / "b/last.pt")["step"] == 2
    resumed = run(tmp_path / "b/last.pt")
    assert all(torch.equal(whole.net.state_dict()[k], v) for k, v in resumed.net.state_dict().items())
    state = checkpoint.load(tmp_path / "a/last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * (1 - 9 / 10))  # the last step's
