"""The numbers behind the report, read from MLflow: curves per init x method x seed, compute to a
target, and one verdict per claim of the paper that the run can test, as data: a verdict code
(`verdicts`), the reason where the rule could not decide, and the facts it rests on; the report
layer (`claim_text`) words them. The rules' thresholds are `report:` in params.yaml.

Every value comes from the tracking store (`search_runs` and `get_metric_history` on the runs
whose ids the stages wrote beside their outputs), so the report and the MLflow UI cannot differ.
Seeds are summarised by the mean curve (mean metric and mean compute at each logged step) and
its spread (min to max over seeds); a target is reached where the mean curve first gets to it.

Compute for an init counts the stages it depends on (its module's `upstream`) under two accountings
(`ACCOUNTINGS`): "total" counts every one (random = post-training; diffusion = pre-training +
post-training; CMT = pre-training + trajectories + mid-training + post-training), "given_teacher" all
but the teacher's pre-training (the teacher is a checkpoint someone else trained, as in the paper's
consistency-model runs). A claim is judged under the accounting of the paper's figure for it (the
method's `accounting`), with the other beside it; where the paper does not say, under both.

Compute is measured two ways (`MEASURES`): wall time of training steps x devices (device-hours, the
headline figure) and counted floating-point work (FLOPs, ledger.py), which does not move with machine
load; a verdict rests on `report.measure` (FLOPs by default), with the other measure beside it.

Claims 1-3 compare compute to a target: the ratio CMT / baseline of where their seed-mean curves
reach the baseline's final value, with a bootstrap interval over seeds (each init's seeds resampled,
target and crossings recomputed in every resample). It holds when the interval lies below 1, does not
when above, and is not resolved otherwise; `resolvable` says how far from 1 a ratio must be for an
interval of this width to exclude 1, so "not resolved" reads as "no effect" or as "too few seeds".
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
from .verdicts import ACCOUNTING_UNKNOWN, AT_FLOOR, FAILS, HOLDS, NEVER_REACHED, NO_STUDY, NOT_RESOLVED, NOT_RUN, \
    NOT_TESTED, TOO_FEW_SEEDS

TARGET_INITS = ("diffusion", "random")  # whose final values are the targets the claims time the others to
# the upstream stages each accounting leaves out of an init's compute (see the module docstring)
ACCOUNTINGS = {"total": (), "given_teacher": ("pretrain",)}
# the compute measures a verdict can rest on (report.measure), by the prefix of their curve columns
# (hours_total, flops_given_teacher, ...)
MEASURES = {"flops": "flops", "device_hours": "hours"}


def client_for(params: Params):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri(params))


def crossing(values: np.ndarray, target: float) -> tuple[int, float] | None:
    """(i, frac): the curve first gets to `target` or below between logged points i - 1 and i, at
    `frac` of the way (i = 0: at the first point); None if it never does."""
    hits = np.flatnonzero(values <= target)
    if len(hits) == 0:
        return None
    i = int(hits[0])
    return (0, 0.0) if i == 0 else (i, float((values[i - 1] - target) / (values[i - 1] - values[i])))


def _at(x: np.ndarray, where: tuple[int, float]) -> float:
    i, frac = where
    return float(x[0]) if i == 0 else float(x[i - 1] + frac * (x[i] - x[i - 1]))


def reach(curve: pd.DataFrame, metric: str, target: float, columns=("device_hours", "images_seen")) -> dict | None:
    """Where the curve first gets to `target` or below, linearly interpolated between logged points;
    None if it never does."""
    where = crossing(curve[metric].to_numpy(), target)
    return None if where is None else {c: _at(curve[c].to_numpy(), where) for c in columns}


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
    out = grouped[["device_hours", "total_hours", "flops_total", "images_seen", *value_cols]].mean()
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
    upstream: dict  # measure -> accounting -> (method, init) -> compute before post-training
    floor: float | None
    floor_n: int | None
    features: dict
    device: str
    post_runs: dict
    targets: dict = field(default_factory=dict)  # (method, target init) -> value
    to_target: pd.DataFrame | None = None
    rules: ReportConfig = field(default_factory=ReportConfig)  # the verdicts' thresholds (report: in params)
    stage_flops: dict = field(default_factory=dict)  # as stage_hours, in counted FLOPs
    # pretrain.source import: the teacher was not trained here (its measured compute is 0); the
    # device-hours its user declares for it, if any (None: not declared)
    teacher_imported: bool = False
    declared_teacher_hours: float | None = None

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

    per_stage = {}  # measure -> the upstream stages' compute
    for measure in MEASURES:
        spent = {name: runs[rid].data.metrics[measure] for name, rid in stage_ids.items()}
        per_stage[measure] = {"pretrain": spent["pretrain"], "trajectories": spent["trajectories"],
                              "midtrain": {m: spent["midtrain", m] for m in run_methods}}
    upstream = {measure: {acc: {(m, i): sum(spent["midtrain"][m] if s == "midtrain" else spent[s]
                                            for s in inits.get(i).upstream if s not in left_out)
                                for m in run_methods for i in run_inits}
                          for acc, left_out in ACCOUNTINGS.items()}
                for measure, spent in per_stage.items()}

    inloop = [key(metric, ev.inloop_samples), key(metric_1step, ev.inloop_samples)]
    curves = load_curves(client, post_ids, [*MEASURES, "images_seen", *inloop])
    curves = curves.rename(columns={inloop[0]: metric, inloop[1]: metric_1step})
    for measure, prefix in MEASURES.items():
        for acc in ACCOUNTINGS:
            curves[f"{prefix}_{acc}"] = [upstream[measure][acc][m, i]
                                         for m, i in zip(curves["method"], curves["init"])] + curves[measure]
    curves["total_hours"] = curves["hours_total"]

    last = curves.sort_values("step").groupby(["method", "init", "seed"]).last()
    finals = pd.DataFrame([{
        "method": m, "init": i, "seed": s,
        "posttrain_hours": last.loc[(m, i, s), "device_hours"], "total_hours": last.loc[(m, i, s), "total_hours"],
        "images_seen": last.loc[(m, i, s), "images_seen"], "posttrain_flops": last.loc[(m, i, s), "flops"],
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
                   mean=mean_curves(curves, [metric, metric_1step]), finals=finals, stage_hours=per_stage["device_hours"], upstream=upstream, floor=floor,
                   floor_n=floor_n if floor is not None else None,
                   features={"metric": params.fd_name, "kind": params.features,
                             "heldout_accuracy": features_run.data.metrics.get("heldout_accuracy")},
                   device=runs[first].data.tags.get("device", "an unknown device"), post_runs=post_ids,
                   rules=params.report, stage_flops=per_stage["flops"])
    teacher_tags = runs[stage_ids["pretrain"]].data.tags
    res.teacher_imported = teacher_tags.get("teacher_source") == "import"
    if "declared_device_hours" in teacher_tags:
        res.declared_teacher_hours = float(teacher_tags["declared_device_hours"])
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
                    hit = reach(mean[mean.init == init], metric, target,
                                ("device_hours", "total_hours", "flops_total", "images_seen"))
                    per_seed = [reach(c.sort_values("step"), metric, target, ("total_hours",))
                                for _, c in res.curves[(res.curves.method == method) & (res.curves.init == init)]
                                .groupby("seed")]
                    reached = [h["total_hours"] for h in per_seed if h is not None]
                    rows.append({"metric": metric, "method": method, "target_init": target_init, "target": target,
                                 "init": init,
                                 "posttrain_hours": hit and hit["device_hours"], "total_hours": hit and hit["total_hours"],
                                 "total_flops": hit and hit["flops_total"], "images": hit and hit["images_seen"],
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


# --- compute ratios with intervals over seeds -----------------------------------------------------

def _seed_curves(res: Evidence, method: str, init: str, metric: str, hours: str) -> tuple[np.ndarray, np.ndarray]:
    """(metric, compute) as [seed, logged point] arrays, the points every seed logged."""
    c = res.curves[(res.curves.method == method) & (res.curves.init == init)]
    values = c.pivot(index="seed", columns="step", values=metric).dropna(axis=1)
    return values.to_numpy(float), c.pivot(index="seed", columns="step", values=hours)[values.columns].to_numpy(float)


def _compute_ratio(cmt: tuple[np.ndarray, np.ndarray], base: tuple[np.ndarray, np.ndarray]) -> float:
    """Compute where CMT's seed-mean curve reaches the baseline's final mean value, over the
    baseline's own (inf: CMT never gets there, or the baseline needed none and CMT some; nan: neither
    needed any)."""
    target = base[0].mean(0)[-1]
    base_hit, cmt_hit = crossing(base[0].mean(0), target), crossing(cmt[0].mean(0), target)
    base_cost = _at(base[1].mean(0), base_hit)
    if cmt_hit is None:
        return float("inf")
    cmt_cost = _at(cmt[1].mean(0), cmt_hit)
    if base_cost > 0:
        return cmt_cost / base_cost
    return float("inf") if cmt_cost > 0 else float("nan")  # the baseline needed nothing: CMT cannot save


def ratio_interval(res: Evidence, method: str, metric: str, base_init: str, hours: str) -> dict:
    """The ratio CMT / `base_init` of compute to the baseline's final `metric` (compute column `hours`),
    its bootstrap interval at report.confidence over seeds, and the ratios this interval's width could
    tell from 1 (`resolvable`: below it or above its inverse; None when the interval is unbounded)."""
    cmt, base = (_seed_curves(res, method, i, metric, hours) for i in ("cmt", base_init))
    rng = np.random.default_rng(0)  # the same resamples on every rerun: the report is reproducible
    n = res.rules.resamples
    picks = rng.integers(0, len(cmt[0]), (n, len(cmt[0]))), rng.integers(0, len(base[0]), (n, len(base[0])))
    boot = np.array([_compute_ratio((cmt[0][a], cmt[1][a]), (base[0][b], base[1][b])) for a, b in zip(*picks)])
    boot = boot[~np.isnan(boot)]
    tail = (1 - res.rules.confidence) / 2
    # sample quantiles, no interpolation: a share of resamples that never reach (inf) stays inf
    low, high = (np.quantile(boot, [tail, 1 - tail], method="inverted_cdf") if len(boot) else (np.nan, np.nan))
    bounded = 0 < low <= high < np.inf
    return {"ratio": _compute_ratio(cmt, base), "low": float(low), "high": float(high),
            "resolvable": float(np.exp(-(np.log(high) - np.log(low)) / 2)) if bounded else None}


def _judged(res: Evidence, method: str, claim_id: int, intervals: dict[str, dict]) -> tuple[str, str | None]:
    """The verdict of each accounting's interval (written into it) and the claim's: the paper's
    accounting's, or where the paper does not say, the common one (not resolved if they differ)."""
    too_few = len(res.seeds) < res.rules.min_seeds
    for iv in intervals.values():
        iv["verdict"] = (NOT_RESOLVED if too_few or np.isnan(iv["low"]) else
                         HOLDS if iv["high"] < 1 else FAILS if iv["low"] > 1 else NOT_RESOLVED)
    if too_few:
        return NOT_RESOLVED, TOO_FEW_SEEDS
    paper = _accounting(method, claim_id)
    found = {iv["verdict"] for iv in intervals.values()}
    if paper:
        return intervals[paper]["verdict"], None
    return (found.pop(), None) if len(found) == 1 else (NOT_RESOLVED, ACCOUNTING_UNKNOWN)


def _intervals(res: Evidence, method: str, metric: str, base_init: str, measure: str) -> dict[str, dict]:
    return {acc: ratio_interval(res, method, metric, base_init, f"{MEASURES[measure]}_{acc}") for acc in ACCOUNTINGS}


def _weighed(res: Evidence, method: str, claim_id: int, metric: str, base_init: str) -> tuple[str, str | None, dict, dict]:
    """(verdict, reason, facts, numbers) of a compute ratio CMT / `base_init`: the verdict rests on
    report.measure's intervals; the other measure's are judged by the same rule and reported beside."""
    measure = res.rules.measure
    other = next(m for m in MEASURES if m != measure)
    intervals, beside = (_intervals(res, method, metric, base_init, m) for m in (measure, other))
    alone, _ = _judged(res, method, claim_id, beside)  # the verdict the other measure alone would give
    verdict, reason = _judged(res, method, claim_id, intervals)
    facts = {"intervals": intervals, "measure": measure, "beside": {other: beside}, "alone": {other: alone},
             "accounting": _accounting(method, claim_id), "confidence": res.rules.confidence}
    return verdict, reason, facts, {**_numbers(intervals), **_numbers(beside, f"_{other}"), f"verdict_{other}": alone}


def _claim(claim_id: int, method: str, metric: str, verdict: str, reason: str | None = None, **facts) -> dict:
    """A verdict with what it rests on: `facts` for the report's sentences (claim_text), numbers
    beside the verdict for `dvc metrics show`."""
    return {"id": claim_id, "method": method, "verdict": verdict, "reason": reason, "facts": {"metric": metric, **facts}}


def _numbers(intervals: dict[str, dict], suffix: str = "") -> dict:
    """The intervals as flat numbers for claims.json (DVC metrics): ratio_total, low_total, ... (the
    verdict's measure), ratio_total_device_hours, ... (`suffix`: the measure beside it)."""
    return {f"{k}_{acc}{suffix}": v for acc, iv in intervals.items() for k, v in iv.items()
            if k in ("ratio", "low", "high", "resolvable")}


def _accounting(method: str, claim_id: int) -> str | None:
    return methods.get(method).accounting.get(claim_id) if method in methods.REGISTRY else None


def claim_cmt_vs_diffusion(res: Evidence, method: str) -> dict:
    """Claim 1: from CMT, post-training reaches the diffusion init's final quality with less compute."""
    target = res.targets[method, "diffusion", res.metric]
    cmt, diff = (_row(res, res.metric, method, "diffusion", i) for i in ("cmt", "diffusion"))
    if undecided := _undecided(res, target, cmt):
        return _claim(1, method, res.metric, *undecided, target=target, floor=res.floor)
    verdict, reason, facts, numbers = _weighed(res, method, 1, res.metric, "diffusion")
    post = _ratio(cmt["posttrain_hours"], diff["posttrain_hours"])
    return {**_claim(1, method, res.metric, verdict, reason, met_before_posttrain=bool(cmt["images"] == 0),
                     seeds_reached=int(cmt["seeds_reached"]), seeds=int(cmt["seeds"]), **facts),
            **numbers, "ratio_posttrain": post}


def claim_cmt_vs_random(res: Evidence, method: str) -> dict:
    """Claim 2: the paper's 'up to 98% less data and GPU time' than training without CMT, read as
    CMT's data and compute to reach the random init's final quality versus the random init's."""
    target = res.targets[method, "random", res.metric]
    cmt, rnd = (_row(res, res.metric, method, "random", i) for i in ("cmt", "random"))
    if undecided := _undecided(res, target, cmt):
        return _claim(2, method, res.metric, *undecided, target=target, floor=res.floor)
    verdict, reason, facts, numbers = _weighed(res, method, 2, res.metric, "random")
    data = 1 - _ratio(cmt["images"], rnd["images"])
    post = 1 - _ratio(cmt["posttrain_hours"], rnd["posttrain_hours"])
    return {**_claim(2, method, res.metric, verdict, reason, **facts),
            "saving_data": data, "saving_posttrain": post, **numbers}


def claim_from_scratch(res: Evidence, method: str) -> dict:
    """Claim 3 (the paper's for MeanFlow): from CMT vs from scratch, about half the total training
    time to equal or better 1-step quality."""
    metric = res.metric_1step
    if method not in res.methods:
        return _claim(3, method, metric, NOT_TESTED, NOT_RUN)
    target = res.targets[method, "random", metric]
    cmt = _row(res, metric, method, "random", "cmt")
    finals = res.finals[res.finals.method == method].groupby("init")[f"eval_{metric}"].mean()
    better = finals["cmt"] <= finals["random"]
    facts = {"final_key": key(metric, res.final_n), "final_cmt": float(finals["cmt"]),
             "final_random": float(finals["random"])}
    if undecided := _undecided(res, target, cmt):
        return _claim(3, method, metric, *undecided, target=target, floor=res.floor, **facts)
    verdict, reason, weighed, numbers = _weighed(res, method, 3, metric, "random")
    if not better:  # less time, but to a worse end: not the paper's claim, on either measure
        verdict = FAILS if verdict == HOLDS else verdict
        weighed["alone"] = {m: FAILS if v == HOLDS else v for m, v in weighed["alone"].items()}
        numbers.update({f"verdict_{m}": v for m, v in weighed["alone"].items()})
    return {**_claim(3, method, metric, verdict, reason, **weighed, **facts),
            **numbers, "cmt_final_not_worse": bool(better)}


def posttrain_effect(res: Evidence) -> pd.DataFrame:
    """Did post-training help? Per method and init: the in-loop metric at images seen = 0 (the init's
    own quality) and at the end, the change (mean over seeds) and its bootstrap interval over seeds;
    `effect` is improved / worse where the interval excludes 0, else unresolved."""
    rng = np.random.default_rng(0)
    tail = (1 - res.rules.confidence) / 2
    rows = []
    for method in res.methods:
        for init in res.inits:
            values, _ = _seed_curves(res, method, init, res.metric, "images_seen")
            change = values[:, -1] - values[:, 0]
            boot = change[rng.integers(0, len(change), (res.rules.resamples, len(change)))].mean(1)
            low, high = np.quantile(boot, [tail, 1 - tail], method="inverted_cdf")
            effect = ("unresolved" if len(change) < res.rules.min_seeds else
                      "improved" if high < 0 else "worse" if low > 0 else "unresolved")
            rows.append({"method": method, "init": init, "seeds": len(change), "before": values[:, 0].mean(),
                         "after": values[:, -1].mean(), "change": change.mean(), "low": float(low),
                         "high": float(high), "effect": effect})
    return pd.DataFrame(rows)


def claim_sensitivity() -> dict:
    return _claim(4, "all", "", NOT_TESTED, NO_STUDY)


def claims(res: Evidence) -> list[dict]:
    return [*(claim_cmt_vs_diffusion(res, m) for m in res.methods), *(claim_cmt_vs_random(res, m) for m in res.methods),
            *(claim_from_scratch(res, m) for m, spec in methods.REGISTRY.items() if spec.from_scratch),
            claim_sensitivity()]
