"""MLflow tracking: one parent run per pipeline configuration, one nested run per stage and init.

Stages are separate processes (DVC runs them), so the parent is found by a tag holding the
pipeline's fingerprint, and created by whichever stage comes first. A stage that resumes from a
checkpoint reopens its own run and skips metric steps that were already logged (mlflow#10510).
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# MLflow announces a new SQL store's tables and migrations at INFO, between the stages' progress lines;
# its warnings still show
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

from .config import Params, fingerprint, flatten  # noqa: E402

PIPELINE_TAG = "cmt_bench.pipeline"


def project_root(cwd: Path | None = None) -> Path:
    """The repo root, also from inside a DVC temp experiment (<root>/.dvc/tmp/exps/<name>/...)."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri or \
        f"sqlite:///{project_root() / 'mlflow.db'}"


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin handle on one MLflow run of one stage (and init)."""

    def __init__(self, client: MlflowClient, run_id: str, resumed_through_step: int = -1):
        self.client, self.run_id = client, run_id
        self.resumed_through_step = resumed_through_step  # steps <= this were logged before a kill

    @classmethod
    def open(cls, params: Params, stage: str, *, init: str | None = None, method: str | None = None,
             seed: int | None = None, run_id: str | None = None, stage_params: dict | None = None,
             parent_run_id: str | None = None, name: str | None = None, tags: dict | None = None) -> "Tracker":
        """`seed`: a post-training cell's seed, tagged instead of the top-level one. A study's runs
        pass their own parent (the study run, not the pipeline run), name and extra tags."""
        client = MlflowClient(tracking_uri(params))
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            history = client.get_metric_history(run_id, "images_seen")
            return cls(client, run_id, max((m.step for m in history), default=-1))
        experiment_id = _experiment(client, params)
        root = project_root()
        seed = params.seed if seed is None else seed
        tags = {"stage": stage, "preset": params.preset, "seed": str(seed), "git_sha": git_sha(root),
                "mlflow.parentRunId": parent_run_id or _parent_run(client, experiment_id, params), **(tags or {})}
        if init:
            tags["init"] = init
        if method:
            tags["method"] = method
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        if name is None:  # matrix cells: init x method x seed
            name = stage if init is None else f"{stage}-{method}-{init}-seed{seed}"
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        tracker = cls(client, run.info.run_id)
        tracker.log_params(stage_params or {})
        return tracker

    def log_params(self, values: dict) -> None:
        params = [Param(k, str(v)[:6000]) for k, v in flatten(values).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if step <= self.resumed_through_step:
            return  # already in the store from before the restart
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _experiment(client: MlflowClient, params: Params) -> str:
    name = params.tracking.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):  # keep artifacts beside the default store, not in cwd
        location = (project_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent stage
        return client.get_experiment_by_name(name).experiment_id


def pipeline_key(params: Params) -> str:
    # how studies run (workers, storage) is not part of what the pipeline computes
    return fingerprint(params.model_dump(exclude={"studies"}), os.environ.get("DVC_EXP_NAME", ""))


def _parent_run(client: MlflowClient, experiment_id: str, params: Params) -> str:
    key = pipeline_key(params)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline-{params.preset}-{key[:8]}",
                            tags={PIPELINE_TAG: key, "preset": params.preset, "stage": "pipeline"})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(params).items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
