"""Optuna sensitivity studies: one study per (spec, init), trials as nested MLflow runs.

Workers are separate processes that join a study by its storage URL, on this machine (`cmt-bench
study run SPEC --workers N`) or any other (`cmt-bench study worker SPEC --storage URL`). On an RDB
storage every trial sends heartbeats; a worker that dies mid-trial has its trial failed once the
grace period passes and a copy enqueued (RetryHeartbeatStaleTrialCallback), which resumes from the dead
trial's checkpoint into the same MLflow run. Each study stops at `trials` finished trials.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from . import codedeps, inits, linear, methods, progress
from .config import Params, fingerprint
from .data import sha256, write_json
from .layout import FEATURES as FEATURES_DIR
from .layout import STUDIES, STUDY_INDEX, study_checkpoint
from .stages import posttrain as posttrain_stage
from .stages.evaluate import final_scores
from .study_spec import Choices, Range, StudySpec, trial_params
from .tracking import MlflowClient, Tracker, project_root, tracking_uri
from .train import NonFiniteLoss, derive_seed
from .trial_points import TrialPointSampler

# heartbeats and retries are marked experimental since Optuna 2.8; they are what makes workers restartable
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards a study's trials


# --- storage ----------------------------------------------------------------------------------

def storage_url(params: Params, override: str | None = None) -> str:
    return (override or os.environ.get("CMT_BENCH_STUDY_STORAGE") or params.studies.storage
            or f"sqlite:///{project_root() / 'optuna.db'}")


def redacted(url: str) -> str:
    """The URL without its password, for logs and reports."""
    if url.startswith("journal:"):
        return url
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat_seconds: int):
    if url.startswith("journal:"):  # no heartbeat: a killed worker's trial stays RUNNING (use an RDB for that)
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    # SQLite takes the local workers one write at a time: wait for the lock rather than fail (MLflow's
    # SQLite store waits 20 s); trials write a few rows and a heartbeat per interval, so waits are short
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # RetryHeartbeatStaleTrialCallback is Optuna 4.9+'s name for RetryFailedTrialCallback
    return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                          max_retry=3, inherit_intermediate_values=True))


# --- one study per init ------------------------------------------------------------------------

def _code_hash(spec: StudySpec) -> str:
    """Trials of different training or scoring code must not share a study: hash the code a trial runs
    (this module's objective, post-training and evaluation, the spec's method and inits), not the
    analysis (`sensitivity`), which only reads finished trials."""
    entries = [__name__, f"{methods.__name__}.{spec.method}", *(f"{inits.__name__}.{i}" for i in spec.inits)]
    return codedeps.code_hash(codedeps.closure(entries, skip=frozenset({"cmt_bench.sensitivity"})))


def study_name(params: Params, spec: StudySpec, init: str) -> str:
    """<spec>-<init>-<key>: the key covers what a trial's value depends on (spec, parameters, the
    init's weights, the metric's feature space, training code), so a rerun reuses finished trials
    only when they would come out the same."""
    # the feature network and reference statistics (run.json also holds measured seconds: left out)
    features = sorted(p for p in FEATURES_DIR.rglob("*") if p.is_file() and p.name != "run.json")
    inputs = [sha256(p) for p in [*posttrain_stage.posttrain_inputs(init, spec.method), *features]]
    # which cells the pipeline's matrix runs (posttrain.methods, inits, seeds) changes no trial, nor
    # where and how wide the studies run, except the threads of a trial
    ignored = {"studies": set(type(params.studies).model_fields) - {"threads"}, "report": True, "tracking": True,
               "posttrain": {"methods", "inits", "seeds"}}
    key = fingerprint(spec.model_dump(exclude={"path"}), params.model_dump(exclude=ignored), inputs, _code_hash(spec))
    return f"{spec.name}-{init}-{key[:8]}"


def _sampler(spec: StudySpec, init: str, worker: int) -> optuna.samplers.BaseSampler:
    if spec.sampler in ("qmc", "random"):  # trial n's point from n: one study for any number of workers
        return TrialPointSampler(spec.sampler, spec.sampler_seed, distributions(spec))
    # TPE adapts to the trials finished so far, so its points depend on their order whatever the seed
    return optuna.samplers.TPESampler(seed=derive_seed(spec.sampler_seed, spec.name, init, worker) % 2**32)


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cfg = spec.pruner
    if cfg.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_points)
    if cfg.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(reduction_factor=cfg.reduction)
    return optuna.pruners.NopPruner()


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def covered(study: optuna.Study, trials: int) -> bool:
    """Whether the finished trials and the running ones reach `trials`: then a worker starts no other.
    Optuna's MaxTrialsCallback counts finished ones only, so a second worker started trials that the
    analysis would not count (63 for 60 in the toy studies). A trial left running by a dead worker is
    failed and retried by the driver (`_reap`)."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))) >= trials


def stop_when_covered(trials: int):
    """The callback that ends a worker's run of a study once it is `covered`."""
    def stop(study: optuna.Study, trial: FrozenTrial) -> None:
        if covered(study, trials):
            study.stop()
    return stop


def prepare(params: Params, spec: StudySpec, url: str) -> dict[str, optuna.Study]:
    """Create (or load) each init's study and its MLflow study run, before any worker starts."""
    storage, studies = open_storage(url, params.studies.heartbeat_seconds), {}
    for init in spec.inits:
        name = study_name(params, spec, init)
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
        if "mlflow_run_id" not in study.user_attrs:
            tracker = Tracker.open(params, "study", init=init, method=spec.method, seed=spec.seed,
                                   name=f"study-{spec.name}-{init}",
                                   tags={"study": spec.name, "optuna_study": name, "optuna_storage": redacted(url)},
                                   stage_params={"spec": spec.model_dump(exclude={"name", "path"})})
            for key, value in {"spec": spec.name, "init": init, "method": spec.method, "metric": spec.metric(params),
                               "mlflow_run_id": tracker.run_id}.items():
                study.set_user_attr(key, value)
        studies[init] = study
    return studies


# --- the objective -----------------------------------------------------------------------------

def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The spec's space as the Optuna distributions its trials suggest from."""
    def one(dist: Range | Choices) -> BaseDistribution:
        if isinstance(dist, Choices):
            return CategoricalDistribution(dist.choices)
        if dist.int:
            return IntDistribution(int(dist.low), int(dist.high), log=dist.log)
        return FloatDistribution(dist.low, dist.high, log=dist.log)
    return {key: one(dist) for key, dist in spec.space.items()}


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


def _origin(trial: optuna.Trial) -> int:
    """The number of the trial this one retries (the first of a chain), else its own: a retry
    resumes from its origin's checkpoint."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number == trial.number)
    return (RetryHeartbeatStaleTrialCallback.retry_history(frozen) or [trial.number])[0]


def objective(params: Params, spec: StudySpec, init: str, study_run_id: str):
    """A trial: post-train from `init` with the sampled values at the study's budget, report the
    in-loop metric at each logged point to the pruner, and return the final metric. Without a pruner
    the trial scores no in-loop points: nothing reads them (about a tenth of a toy trial's time)."""
    metric = spec.metric(params)
    prunes = spec.pruner.kind != "none"
    inloop_key, final_key = f"{metric}_n{params.evaluate.inloop_samples}", f"{metric}_n{params.evaluate.samples}"

    def run(trial: optuna.Trial) -> float:
        values = {key: _suggest(trial, key, dist) for key, dist in distributions(spec).items()}
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (and who to blame)
        p = trial_params(params, spec, values, f"trial {trial.number}")
        origin = _origin(trial)
        ckpt_dir = study_checkpoint(trial.study.study_name, origin)
        runs: list[Tracker] = []

        def open_run(run_id: str | None) -> Tracker:
            tracker = Tracker.open(p, "study_trial", init=init, method=spec.method, seed=spec.seed, run_id=run_id,
                                   parent_run_id=study_run_id, name=f"{spec.name}-{init}-trial{origin}",
                                   tags={"study": spec.name, "optuna_study": trial.study.study_name,
                                         "trial_number": str(origin)},
                                   stage_params={"posttrain": posttrain_stage.posttrain_params(p, spec.method),
                                                 "trial": values})
            if run_id is not None:
                tracker.set_tags({"retried_as_trial": str(trial.number)})
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            runs.append(tracker)
            return tracker

        def on_point(images_seen: int, logged: dict[str, float]) -> None:
            point = round(images_seen / p.posttrain.train.log_every_images)
            trial.report(logged[inloop_key], point)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{inloop_key}={logged[inloop_key]:.4g} at {images_seen} images")

        try:
            result, tracker = posttrain_stage.train_posttrain(
                p, init, spec.method, spec.seed, ckpt=ckpt_dir / "last.pt", open_run=open_run,
                on_point=on_point if prunes else None, inloop=prunes)
        except optuna.TrialPruned as exc:
            runs[-1].set_tags({"outcome": "pruned", "pruned_at": str(exc)})
            runs[-1].finish("KILLED")
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            raise
        except NonFiniteLoss as exc:  # FAILED in MLflow with the reason; the last good checkpoint stays
            trial.set_user_attr("diverged", True)
            runs[-1].set_tags({"outcome": "diverged"})
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        scores, _, _ = final_scores(p, result.ema, methods.get(spec.method).two_step)
        tracker.log_metrics(result.steps, scores)
        tracker.set_tags({"outcome": "complete"})
        tracker.finish()
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for key, value in result.ledger.metrics().items():
            trial.set_user_attr(key, value)
        return scores[final_key]
    return run


# --- workers and the driver --------------------------------------------------------------------

def run_worker(params: Params, spec: StudySpec, url: str, worker: int = 0) -> None:
    """Run trials of each init's study until it has `spec.trials` finished ones (creating the study
    if this worker is the first), each on studies.threads torch threads."""
    torch.set_num_threads(params.studies.threads)
    linear.use(params.compute.matmul)
    _quiet_trials()
    for init, study in prepare(params, spec, url).items():
        study.sampler, study.pruner = _sampler(spec, init, worker), _pruner(spec)
        if covered(study, spec.trials):
            continue
        # no gc.collect() after each trial (Optuna's gc_after_trial): it took 0.27 s of a 13 s toy trial,
        # and reference counting frees a finished trial's network and data
        study.optimize(objective(params, spec, init, study.user_attrs["mlflow_run_id"]),
                       callbacks=[stop_when_covered(spec.trials)], gc_after_trial=False)


def _reap(studies: dict[str, optuna.Study], params: Params, url: str) -> bool:
    """Fail trials left RUNNING by a dead worker once their heartbeat is stale (which enqueues their
    retries); True if some study still lacks trials."""
    if url.startswith("journal:"):
        return False
    grace = 2 * params.studies.heartbeat_seconds
    for study in studies.values():
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            time.sleep(grace + 1)
            optuna.storages.fail_stale_trials(study)
    return True


def _quiet_trials() -> None:
    """No line per trial from Optuna (its storage, trials.csv and MLflow hold each trial's value and
    parameters) nor a bar per trial: the study's bar on a terminal, its closing line in a log."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    progress.no_bars()


@contextmanager
def _trials_bar(spec: StudySpec, studies: dict[str, optuna.Study]):
    """A bar of finished trials over all inits, polled from the storage while the workers run."""
    if not progress.live():
        yield
        return
    bar, stop = progress.bar(spec.trials * len(studies), f"studies@{spec.name}", "trial"), threading.Event()

    def poll() -> None:
        while not stop.wait(2.0):
            bar.n = sum(min(finished(s), spec.trials) for s in studies.values())
            bar.refresh()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def run_study(params: Params, spec: StudySpec, workers: int = 1, url: str | None = None,
              params_file: str = "params.yaml") -> dict[str, optuna.Study]:
    """Run a study to its trial count with `workers` processes on this machine, then write its results."""
    url = storage_url(params, url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # nor its line per study created (prepare)
    studies = prepare(params, spec, url)
    with _trials_bar(spec, studies):
        if workers == 1:
            run_worker(params, spec, url)
        else:
            _run_processes(spec, url, workers, params_file)
        for _ in range(3):  # a worker killed mid-trial: fail its trial, then finish the retries here
            if all(finished(s) >= spec.trials for s in studies.values()) or not _reap(studies, params, url):
                break
            run_worker(params, spec, url, worker=workers)
    return studies


def _run_processes(spec: StudySpec, url: str, workers: int, params_file: str) -> None:
    cmd = [sys.executable, "-m", "cmt_bench", "--params", params_file, "study", "worker", spec.path, "--storage", url]
    procs = [subprocess.Popen([*cmd, "--index", str(i)]) for i in range(workers)]
    codes = [p.wait() for p in procs]
    crashed = [(i, c) for i, c in enumerate(codes) if c > 0]
    if crashed:  # an exception in a trial is a bug to fix, not something to retry
        raise RuntimeError(f"study {spec.name}: worker(s) exited with an error: "
                           + ", ".join(f"worker {i} (exit {c})" for i, c in crashed))
    for i, code in enumerate(codes):
        if code < 0:
            print(f"[study {spec.name}] worker {i} was killed (signal {-code}); its trial is retried", file=sys.stderr)


# --- results -----------------------------------------------------------------------------------

def write_index(names: list[str]) -> None:
    """The studies the report shows (artifacts/studies/index.json), written even when none is listed."""
    STUDIES.mkdir(parents=True, exist_ok=True)
    write_json(STUDY_INDEX, {"specs": names})


def write_results(params: Params, spec: StudySpec, studies: dict[str, optuna.Study], url: str,
                  workers: int) -> Path:
    """The study's results for the report (`artifacts/studies/<name>/`): every trial, parameter
    importances and the spread of outcomes per init; the same summary goes to each study run."""
    from . import sensitivity
    out = STUDIES / spec.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    frame = sensitivity.trials_frame(studies)
    frame.to_csv(out / "trials.csv", index=False)  # every trial; the analysis counts the first spec.trials
    counted = sensitivity.counted(frame, spec.trials)
    numbers = {init: group["number"].tolist() for init, group in counted.groupby("init")}
    sensitivity.importances(studies, numbers).to_csv(out / "importances.csv", index=False)
    spread = sensitivity.spread(counted, params.report.within_best)
    trials = [t for s in studies.values() for t in s.get_trials(deepcopy=False, states=FINISHED)]
    start = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    end = max((t.datetime_complete for t in trials if t.datetime_complete), default=None)
    metric = spec.metric(params)
    summary = {"spec": spec.model_dump(exclude={"path"}), "metric": metric,
               "final_key": f"{metric}_n{params.evaluate.samples}", "storage": redacted(url), "workers": workers,
               "studies": {init: s.study_name for init, s in studies.items()},
               "wall_seconds": (end - start).total_seconds() if start and end else None,  # first start to last end
               "spread": spread.reset_index().to_dict(orient="records")}
    write_json(out / "study.json", summary)
    for init, study in studies.items():
        row = spread.loc[init] if init in spread.index else None
        tracker = Tracker(MlflowClient(tracking_uri(params)), study.user_attrs["mlflow_run_id"])
        if row is not None:
            tracker.log_metrics(0, {k: float(v) for k, v in row.items() if v == v})  # NaN: no completed trial
        tracker.finish()
    return out
