"""Studies past one process: two workers on PostgreSQL (Optuna RDB storage) logging to a real MLflow
tracking server backed by PostgreSQL, one of them SIGKILLed mid-trial; two on the default SQLite
stores (what `make toy` runs); and a JournalStorage file."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import make_repo, mlflow_server, postgres_database, sh
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

SPACE = {"posttrain.train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
         "posttrain.train.batch_size": {"choices": [128, 256]}}
# long enough trials (about 5 s) that a kill lands mid-trial, checkpointed every 4096 images
KILL_SPEC = {"preset": "smoke", "method": "ect", "inits": ["random", "cmt"], "trials": 5, "pruner": {"kind": "none"},
             "objective": {"budget_images": 131072}, "space": SPACE}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A smoke repo through mid-training (the stages a study starts from), heartbeat every second."""
    repo, env = make_repo(tmp_path_factory.mktemp("parallel"), "smoke",
                          {"posttrain": {"methods": ["ect"], "seeds": [0]},
                           "studies": {"specs": [], "heartbeat_seconds": 1}})
    sh("dvc repro midtrain", repo, env)
    (repo / "experiments/studies/kill.yaml").write_text(yaml.safe_dump(KILL_SPEC))
    return repo, env


def _trials(storage, name_prefix: str) -> dict[str, list]:
    """`storage`: a URL, or for a polling loop one storage object: each URL opens a new connection
    pool, and polling with URLs left 47 idle PostgreSQL connections in this process (one CI run under
    load hit PostgreSQL's 100)."""
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith(name_prefix)}


def _values(storage) -> dict[tuple, float]:
    """{(study, parameters): value} of the complete trials of the kill spec's studies."""
    return {(name, tuple(sorted(t.params.items()))): t.value
            for name, trials in _trials(storage, "kill-").items() for t in trials if t.state == TrialState.COMPLETE}


def _kill_a_worker_mid_trial(repo, storage: str, driver: subprocess.Popen) -> tuple[int, int]:
    """SIGKILL the worker of a RUNNING trial that has written its checkpoint; (pid, trial number)."""
    deadline, polled = time.time() + 180, optuna.storages.RDBStorage(storage)
    try:
        while time.time() < deadline and driver.poll() is None:
            for name, trials in _trials(polled, "kill-").items():
                for t in trials:
                    ckpt = repo / "checkpoints/studies" / name / f"trial{t.number}" / "last.pt"
                    if t.state == TrialState.RUNNING and ckpt.exists() and "worker" in t.user_attrs:
                        pid = int(t.user_attrs["worker"].rsplit(":", 1)[1])
                        os.kill(pid, signal.SIGKILL)
                        return pid, t.number
            time.sleep(0.2)
    finally:
        polled.engine.dispose()
    raise AssertionError(f"no checkpointed running trial to kill:\n{driver.communicate()[1][-3000:]}")


def test_two_workers_on_postgres_survive_a_sigkill(upstream, tmp_path):
    repo, env = upstream
    with postgres_database() as optuna_db, postgres_database() as mlflow_db, \
            mlflow_server(tmp_path, mlflow_db) as server:
        run_env = {**env, "MLFLOW_TRACKING_URI": server}
        driver = subprocess.Popen([sys.executable, "-m", "cmt_bench", "study", "run", "kill", "--workers", "2",
                                   "--storage", optuna_db], cwd=repo, env=run_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        killed_pid, killed_trial = _kill_a_worker_mid_trial(repo, optuna_db, driver)
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-4000:]
        assert f"was killed (signal {signal.SIGKILL})" in err and "database is locked" not in out + err

        studies = _trials(optuna_db, "kill-")
        assert len(studies) == 2
        for name, trials in studies.items():
            states = [t.state for t in trials]
            assert TrialState.RUNNING not in states and TrialState.WAITING not in states  # nothing stuck
            assert states.count(TrialState.COMPLETE) >= KILL_SPEC["trials"]  # the trial count completed
        failed = [(n, t) for n, ts in studies.items() for t in ts if t.state == TrialState.FAIL]
        assert [t.number for _, t in failed] == [killed_trial]
        study, dead = failed[0]
        assert dead.user_attrs["worker"].endswith(f":{killed_pid}")
        retry = next(t for t in studies[study] if t.system_attrs.get("failed_trial") == killed_trial)
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params
        # the retry resumed the dead trial's checkpoint into the same MLflow run
        assert retry.user_attrs["mlflow_run_id"] == dead.user_attrs["mlflow_run_id"]

        client = MlflowClient(server)
        exp = client.get_experiment_by_name("cmt_bench")
        runs = client.search_runs([exp.experiment_id], "tags.study = 'kill'", max_results=500)
        study_runs = {r.info.run_id: r for r in runs if r.data.tags["stage"] == "study"}
        trial_runs = [r for r in runs if r.data.tags["stage"] == "study_trial"]
        complete = [t for ts in studies.values() for t in ts if t.state == TrialState.COMPLETE]
        assert len(study_runs) == 2 and len(trial_runs) == len(complete)  # every trial arrived, once
        for r in trial_runs:
            assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] in study_runs
            assert r.data.metrics["fd_raw_2step_n1000"] > 0  # the final metric (evaluate.samples)
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "images_seen")]
            assert len(steps) == len(set(steps)) == 131072 // 2048 + 1  # no point lost or logged twice
        resumed = next(r for r in trial_runs if r.info.run_id == dead.user_attrs["mlflow_run_id"])
        assert resumed.data.tags["retried_as_trial"] == str(retry.number)
        value = {t.user_attrs["mlflow_run_id"]: t.value for t in complete}
        assert all(r.data.metrics["fd_raw_2step_n1000"] == pytest.approx(value[r.info.run_id]) for r in trial_runs)
        for run in study_runs.values():  # each study run ends with its summary
            assert run.info.status == "FINISHED" and run.data.metrics["completed"] >= KILL_SPEC["trials"]
        results = json.loads((repo / "artifacts/studies/kill/study.json").read_text())
        assert results["workers"] == 2 and "postgresql+psycopg://" in results["storage"]

        # The same study on one worker (another storage, so no trial is reused) gives every trial the
        # value the two workers gave it, the killed-and-resumed one included: each trial runs on
        # studies.threads threads whatever the worker count (1 and 2 threads agreed on none of toy_ect's).
        journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "one.log")))
        sh(f"python -m cmt_bench study run kill --workers 1 --storage journal:{tmp_path / 'one.log'}", repo, env)
        one, two = _values(journal), _values(optuna_db)
        common = one.keys() & two.keys()
        # trial n's point follows from n (trial_points), whichever worker drew it; the retry took a trial
        # number with the dead trial's point, so that number's own point is missing from the two workers' set
        assert len(one) == 2 * KILL_SPEC["trials"] and len(common) >= len(one) - 1
        assert {k: (one[k], two[k]) for k in common if one[k] != two[k]} == {}


def test_two_workers_on_the_default_sqlite_stores(upstream, tmp_path):
    """Nothing configured: studies.workers (2) share optuna.db and mlflow.db, and give the values one
    worker gives (on a journal file, so no trial is reused)."""
    repo, env = upstream
    # as the toy specs: QMC over ranges
    spec = {**KILL_SPEC, "inits": ["cmt"], "trials": 4, "objective": {"budget_images": 32768}, "sampler": "qmc",
            "space": {**SPACE, "posttrain.train.batch_size": {"low": 128, "high": 256, "int": True}}}
    (repo / "experiments/studies/pair.yaml").write_text(yaml.safe_dump(spec))
    out = sh("python -m cmt_bench study run pair", repo, env)
    assert "database is locked" not in out
    storage = f"sqlite:///{repo / 'optuna.db'}"
    results = json.loads((repo / "artifacts/studies/pair/study.json").read_text())
    assert results["workers"] == 2 and results["storage"] == storage
    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith("pair-")]
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    complete = {t.user_attrs["mlflow_run_id"]: t.value for t in trials if t.state == TrialState.COMPLETE}
    # exactly the trial count: a worker starts no trial once the finished and running ones cover it
    assert len(complete) == spec["trials"] == len(trials)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cmt_bench")
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.study = 'pair'", max_results=100)
            if r.data.tags["stage"] == "study_trial"]
    assert sorted(r.info.run_id for r in runs) == sorted(complete)  # every trial arrived, once
    assert all(r.info.status == "FINISHED" and r.data.metrics["fd_raw_2step_n1000"] == complete[r.info.run_id]
               for r in runs)
    for r in runs:  # no pruner: each logged point has its loss, but no in-loop score (evaluate.inloop_samples)
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 32768 // 2048  # a point per 2048 images
        assert client.get_metric_history(r.info.run_id, "sw_2step_n500") == []
    one = tmp_path / "one.log"
    sh(f"python -m cmt_bench study run pair --workers 1 --storage journal:{one}", repo, env)
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(one)))
    two = {(t.number, tuple(sorted(t.params.items()))): t.value for t in trials if t.state == TrialState.COMPLETE}
    (single,) = optuna.get_all_study_summaries(journal)
    alone = {(t.number, tuple(sorted(t.params.items()))): t.value
             for t in optuna.load_study(study_name=single.study_name, storage=journal).get_trials()}
    assert alone == {k: v for k, v in two.items() if k[0] < len(alone)}


def test_journal_storage_file(upstream):
    """A JournalStorage file is the no-server alternative: the same study runs on it."""
    repo, env = upstream
    spec = {**KILL_SPEC, "inits": ["cmt"], "trials": 2, "objective": {"budget_images": 4096}}
    (repo / "experiments/studies/journal.yaml").write_text(yaml.safe_dump(spec))
    journal = repo / "studies.log"
    sh(f"python -m cmt_bench study run journal --workers 1 --storage journal:{journal}", repo, env)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and all(t.value > 0 for t in trials)
