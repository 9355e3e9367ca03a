"""The numbers behind the report, read from MLflow: curves per init x method x seed, compute to a
target, and one verdict per claim of the paper that the run can test, as data: a verdict code
(`verdicts`), the reason where the rule could not decide, and the facts it rests on; the report
layer (`claim_text`) words them. The rules' thresholds are `report:` in params.yaml.

Every value comes from the tracking store (`search_runs` and `get_metric_history` on the runs
whose ids the stages wrote beside their outputs), so the report and the MLflow UI cannot differ.
Seeds are summarised by the mean curve (mean metric and mean compute at each logged step) and
its spread (min to max over seeds); a target is reached where the mean curve first gets to it.

Compute for an init counts every stage it depends on (its module's `upstream`): random =
post-training; diffusion = pre-training + post-training; CMT = pre-training + trajectories +
mid-training + post-training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import inits, methods
from .config import Params, ReportConfig
from .data import read_json
from .layout import out_dir
from .scoring import family, key
from .tracking import tracking_uri
from .verdicts import AT_FLOOR, FAILS, HOLDS, NEVER_REACHED, NO_STUDY, NOT_RESOLVED, NOT_RUN, NOT_TESTED

TARGET_INITS = ("diffusion", "random")  # whose final values are the targets the claims time the others to


def client_for(params: Params):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri(params))


def reach(curve: pd.DataFrame, metric: str, target: float, columns=("device_hours", "images_seen")) -> dict | None:
    """Where the curve first gets to `target` or below, linearly interpolated between logged points;
    None if it never does."""
    values = curve[metric].to_numpy()
    hits = np.flatnonzero(values <= target)
    if len(hits) == 0:
        return None
    i = hits[0]
    if i == 0:
        return {c: float(curve[c].iloc[0]) for c in columns}
    frac = (values[i - 1] - target) / (values[i - 1] - values[i])
    return {c: float(curve[c].iloc[i - 1] + frac * (curve[c].iloc[i] - curve[c].iloc[i - 1])) for c in columns}


def runs_by_id(client, experiment: str, run_ids: list[str]) -> dict:
    """The MLflow runs with these ids, by search (100 ids a call), not one call per run."""
    exp = client.get_experiment_by_name(experiment)
    found = {}
    for start in range(0, len(run_ids) if exp else 0, 100):
        chunk = run_ids[start:start + 100]
        ids = ", ".join(f"'{r}'" for r in chunk)
        for run in client.search_runs([exp.experiment_id], f"attributes.run_id IN ({ids})", max_results=len(chunk)):
            found[run.info.run_id] = run
    missing = set(run_ids) - set(found)
    if missing:
        raise LookupError(f"{len(missing)} run(s) the stages recorded (e.g. {sorted(missing)[0]}) are not in "
                          f"experiment {experiment!r} of the tracking store {client.tracking_uri}: was the "
                          "pipeline run against another store? (MLFLOW_TRACKING_URI / tracking.uri)")
    return found


def load_curves(client, run_ids: dict[tuple, str], keys: list[str]) -> pd.DataFrame:
    """One row per logged step of each (method, init, seed) post-training run."""
    frames = []
    for (method, init, seed), run_id in run_ids.items():
        cols = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
        frame = pd.DataFrame(cols).rename_axis("step").reset_index().sort_values("step")
        frames.append(frame.assign(method=method, init=init, seed=seed))
    return pd.concat(frames, ignore_index=True)


def mean_curves(curves: pd.DataFrame, value_cols: list[str]) -> pd.DataFrame:
    """Per (method, init, step): the mean over seeds of compute and metric, and the metric's min/max."""
    grouped = curves.groupby(["method", "init", "step"])
    out = grouped[["device_hours", "total_hours", "images_seen", *value_cols]].mean()
    for col in value_cols:
        out[f"{col}_min"], out[f"{col}_max"] = grouped[col].min(), grouped[col].max()
    out["seeds"] = grouped.size()
    return out.reset_index()


@dataclass
class Evidence:
    metric: str  # e.g. fd_digits_2step
    metric_1step: str
    inloop_n: int
    final_n: int
    methods: list[str]
    inits: list[str]
    seeds: list[int]
    curves: pd.DataFrame  # every seed
    mean: pd.DataFrame  # mean over seeds
    finals: pd.DataFrame  # one row per (method, init, seed): final in-loop and final-evaluation values
    stage_hours: dict
    upstream: dict
    floor: float | None
    floor_n: int | None
    features: dict
    device: str
    post_runs: dict
    targets: dict = field(default_factory=dict)  # (method, target init) -> value
    to_target: pd.DataFrame | None = None
    rules: ReportConfig = field(default_factory=ReportConfig)  # the verdicts' thresholds (report: in params)

    @property
    def key(self) -> str:  # the in-loop curve's metric key
        return key(self.metric, self.inloop_n)


def collect(params: Params) -> Evidence:
    client = client_for(params)
    metric = params.report_metric
    metric_1step = f"{family(metric)}_1step"
    ev, run_methods, run_inits, seeds = (params.evaluate, params.posttrain.methods, params.posttrain.inits,
                                         params.posttrain.seeds)
    cells = [(m, i, s) for m in run_methods for i in run_inits for s in seeds]

    def run_id(stage, init=None, method=None, seed=None) -> str:
        return read_json(out_dir(stage, init, method, seed) / "run.json")["run_id"]
    stage_ids = {"pretrain": run_id("pretrain"), "trajectories": run_id("trajectories"),
                 **{("midtrain", m): run_id("midtrain", method=m) for m in run_methods}}
    post_ids = {c: run_id("posttrain", c[1], c[0], c[2]) for c in cells}
    eval_ids = {c: run_id("evaluate", c[1], c[0], c[2]) for c in cells}
    features_id = run_id("features")
    runs = runs_by_id(client, params.tracking.experiment,
                      [*stage_ids.values(), *post_ids.values(), *eval_ids.values(), features_id])

    hours = {name: runs[rid].data.metrics["device_hours"] for name, rid in stage_ids.items()}
    stage_hours = {"pretrain": hours["pretrain"], "trajectories": hours["trajectories"],
                   "midtrain": {m: hours["midtrain", m] for m in run_methods}}
    upstream = {(m, i): sum(stage_hours["midtrain"][m] if s == "midtrain" else stage_hours[s]
                            for s in inits.get(i).upstream)
                for m in run_methods for i in run_inits}

    inloop = [key(metric, ev.inloop_samples), key(metric_1step, ev.inloop_samples)]
    curves = load_curves(client, post_ids, ["device_hours", "images_seen", *inloop])
    curves = curves.rename(columns={inloop[0]: metric, inloop[1]: metric_1step})
    curves["upstream_hours"] = [upstream[m, i] for m, i in zip(curves["method"], curves["init"])]
    curves["total_hours"] = curves["upstream_hours"] + curves["device_hours"]

    last = curves.sort_values("step").groupby(["method", "init", "seed"]).last()
    finals = pd.DataFrame([{
        "method": m, "init": i, "seed": s,
        "posttrain_hours": last.loc[(m, i, s), "device_hours"], "total_hours": last.loc[(m, i, s), "total_hours"],
        "images_seen": last.loc[(m, i, s), "images_seen"],
        f"inloop_{metric}": last.loc[(m, i, s), metric], f"inloop_{metric_1step}": last.loc[(m, i, s), metric_1step],
        f"eval_{metric}": runs[eval_ids[m, i, s]].data.metrics[key(metric, ev.samples)],
        f"eval_{metric_1step}": runs[eval_ids[m, i, s]].data.metrics[key(metric_1step, ev.samples)],
    } for m, i, s in cells])

    features_run = runs[features_id]
    train_count = read_json(out_dir("data") / "manifest.json")["splits"]["train"]["count"]
    floor_n = min(ev.inloop_samples, train_count)
    floor = features_run.data.metrics.get(key(f"{family(metric)}_floor", floor_n))
    first = post_ids[cells[0]]
    res = Evidence(metric=metric, metric_1step=metric_1step, inloop_n=ev.inloop_samples, final_n=ev.samples,
                   methods=run_methods, inits=run_inits, seeds=seeds, curves=curves,
                   mean=mean_curves(curves, [metric, metric_1step]), finals=finals, stage_hours=stage_hours, upstream=upstream, floor=floor,
                   floor_n=floor_n if floor is not None else None,
                   features={"metric": params.fd_name, "kind": params.features,
                             "heldout_accuracy": features_run.data.metrics.get("heldout_accuracy")},
                   device=runs[first].data.tags.get("device", "an unknown device"), post_runs=post_ids,
                   rules=params.report)
    res.targets, res.to_target = compute_to_target(res)
    return res


def compute_to_target(res: Evidence) -> tuple[dict, pd.DataFrame]:
    """Targets (the diffusion and random inits' final values of the mean curve) and, per method,
    init and target, where each init's mean curve and each seed's curve reach it."""
    targets, rows = {}, []
    for metric in (res.metric, res.metric_1step):
        for method in res.methods:
            mean = res.mean[res.mean.method == method].sort_values("step")
            for target_init in TARGET_INITS:
                target = float(mean[mean.init == target_init][metric].iloc[-1])
                targets[method, target_init, metric] = target
                for init in res.inits:
                    hit = reach(mean[mean.init == init], metric, target, ("device_hours", "total_hours", "images_seen"))
                    per_seed = [reach(c.sort_values("step"), metric, target, ("total_hours",))
                                for _, c in res.curves[(res.curves.method == method) & (res.curves.init == init)]
                                .groupby("seed")]
                    reached = [h["total_hours"] for h in per_seed if h is not None]
                    rows.append({"metric": metric, "method": method, "target_init": target_init, "target": target,
                                 "init": init,
                                 "posttrain_hours": hit and hit["device_hours"], "total_hours": hit and hit["total_hours"],
                                 "images": hit and hit["images_seen"],
                                 "seeds_reached": len(reached), "seeds": len(per_seed),
                                 "total_hours_min": min(reached, default=None),
                                 "total_hours_max": max(reached, default=None)})
    return targets, pd.DataFrame(rows)


def _row(res: Evidence, metric: str, method: str, target_init: str, init: str) -> pd.Series:
    t = res.to_target
    return t[(t.metric == metric) & (t.method == method) & (t.target_init == target_init) & (t.init == init)].iloc[0]


def _undecided(res: Evidence, target: float, cmt: pd.Series) -> tuple[str, str] | None:
    """(verdict, reason) where the compute ratio cannot decide: a target at the noise floor, or a
    CMT mean curve that never got there."""
    if res.floor is not None and target <= res.rules.floor_margin * res.floor:
        return NOT_RESOLVED, AT_FLOOR
    if pd.isna(cmt["total_hours"]):
        return FAILS, NEVER_REACHED
    return None


def _ratio(a, b) -> float:
    return float("nan") if a is None or b is None or pd.isna(a) or pd.isna(b) or not b else float(a) / float(b)


def _claim(claim_id: int, method: str, metric: str, verdict: str, reason: str | None = None, **facts) -> dict:
    """A verdict with what it rests on: `facts` for the report's sentences (claim_text), numbers
    beside the verdict for `dvc metrics show`."""
    return {"id": claim_id, "method": method, "verdict": verdict, "reason": reason, "facts": {"metric": metric, **facts}}


def claim_cmt_vs_diffusion(res: Evidence, method: str) -> dict:
    """Claim 1: from CMT, post-training reaches the diffusion init's final quality with less total compute."""
    target = res.targets[method, "diffusion", res.metric]
    cmt, diff = (_row(res, res.metric, method, "diffusion", i) for i in ("cmt", "diffusion"))
    if undecided := _undecided(res, target, cmt):
        return _claim(1, method, res.metric, *undecided, target=target, floor=res.floor)
    total, post = _ratio(cmt["total_hours"], diff["total_hours"]), _ratio(cmt["posttrain_hours"], diff["posttrain_hours"])
    verdict = NOT_RESOLVED if abs(total - 1) < res.rules.time_tie else HOLDS if total < 1 else FAILS
    return {**_claim(1, method, res.metric, verdict, met_before_posttrain=bool(cmt["images"] == 0),
                     seeds_reached=int(cmt["seeds_reached"]), seeds=int(cmt["seeds"])),
            "ratio_total": total, "ratio_posttrain": post}


def claim_cmt_vs_random(res: Evidence, method: str) -> dict:
    """Claim 2: the paper's 'up to 98% less data and GPU time' than training without CMT, read as
    CMT's data and compute to reach the random init's final quality versus the random init's."""
    target = res.targets[method, "random", res.metric]
    cmt, rnd = (_row(res, res.metric, method, "random", i) for i in ("cmt", "random"))
    if undecided := _undecided(res, target, cmt):
        return _claim(2, method, res.metric, *undecided, target=target, floor=res.floor)
    data = 1 - _ratio(cmt["images"], rnd["images"])
    post = 1 - _ratio(cmt["posttrain_hours"], rnd["posttrain_hours"])
    total = 1 - _ratio(cmt["total_hours"], rnd["total_hours"])
    verdict = NOT_RESOLVED if abs(total) < res.rules.time_tie else HOLDS if total > 0 else FAILS
    return {**_claim(2, method, res.metric, verdict), "saving_data": data, "saving_posttrain": post,
            "saving_total": total}


def claim_from_scratch(res: Evidence, method: str) -> dict:
    """Claim 3 (the paper's for MeanFlow): from CMT vs from scratch, about half the total training
    time to equal or better 1-step quality."""
    metric = res.metric_1step
    if method not in res.methods:
        return _claim(3, method, metric, NOT_TESTED, NOT_RUN)
    target = res.targets[method, "random", metric]
    cmt, rnd = (_row(res, metric, method, "random", i) for i in ("cmt", "random"))
    finals = res.finals[res.finals.method == method].groupby("init")[f"eval_{metric}"].mean()
    better = finals["cmt"] <= finals["random"]
    facts = {"final_key": key(metric, res.final_n), "final_cmt": float(finals["cmt"]),
             "final_random": float(finals["random"])}
    if undecided := _undecided(res, target, cmt):
        return _claim(3, method, metric, *undecided, target=target, floor=res.floor, **facts)
    saving = 1 - _ratio(cmt["total_hours"], rnd["total_hours"])
    verdict = NOT_RESOLVED if abs(saving) < res.rules.time_tie else HOLDS if saving > 0 and better else FAILS
    return {**_claim(3, method, metric, verdict, **facts), "saving_total": saving, "cmt_final_not_worse": bool(better)}


def claim_sensitivity() -> dict:
    return _claim(4, "all", "", NOT_TESTED, NO_STUDY)


def claims(res: Evidence) -> list[dict]:
    return [*(claim_cmt_vs_diffusion(res, m) for m in res.methods), *(claim_cmt_vs_random(res, m) for m in res.methods),
            *(claim_from_scratch(res, m) for m, spec in methods.REGISTRY.items() if spec.from_scratch),
            claim_sensitivity()]
