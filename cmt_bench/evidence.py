"""The numbers behind the report, read from MLflow: curves per init x method x seed, compute to a
target, and one verdict per claim of the paper that the run can test.

Every value comes from the tracking store (`search_runs` and `get_metric_history` on the runs
whose ids the stages wrote beside their outputs), so the report and the MLflow UI cannot differ.
Seeds are summarised by the mean curve (mean metric and mean compute at each logged step) and
its spread (min to max over seeds); a target is reached where the mean curve first gets to it.

Compute for an init counts every stage it depends on (its module's `upstream`): random =
post-training; diffusion = pre-training + post-training; CMT = pre-training + trajectories +
mid-training + post-training. Methods and inits come from their registries (`cmt_bench/methods/`,
`cmt_bench/inits/`): labels, the paper's figures per method and claim, and upstream stages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import inits, methods
from .config import Params
from .data import read_json
from .layout import out_dir
from .scoring import family, key
from .tracking import tracking_uri

TARGETS = {"diffusion": "the diffusion init's final value", "random": "the random init's final value"}
# A target within this factor of the noise floor cannot tell reaching it from sampling noise.
FLOOR_MARGIN = 1.25
# Compute ratios within this of 1 are a tie: repeated toy runs measured ratios 0.70-0.85 for the
# same weights, from wall-time noise alone.
TIME_TIE = 0.10
HOLDS, FAILS, NOT_RESOLVED, NOT_TESTED = ("holds at this scale", "does not hold at this scale",
                                          "not resolved at this scale", "not tested at this scale")
# claim 4 is about every method at once; the figures of claims 1-3 are in each method's module
SENSITIVITY_PAPER = "post-training from CMT is stable and much less sensitive to hyperparameters"
SOURCE = "Hu, Lai, Mitsufuji, Ermon 2025, Consistency Mid-Training (arXiv 2509.24526)"


def paper(claim_id: int, method: str) -> str:
    """The paper's figure for a claim, as it applies to `method` (its module's `paper`)."""
    if claim_id == 4:
        return SENSITIVITY_PAPER
    figure = methods.get(method).paper.get(claim_id) if method in methods.REGISTRY else None
    return figure or f"the paper gives no figure for {methods.label(method)}"


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
                   methods=run_methods, inits=run_inits, seeds=seeds, curves=curves, mean=mean_curves(curves, [metric, metric_1step]),
                   finals=finals, stage_hours=stage_hours, upstream=upstream, floor=floor,
                   floor_n=floor_n if floor is not None else None,
                   features={"metric": params.fd_name, "kind": params.features,
                             "heldout_accuracy": features_run.data.metrics.get("heldout_accuracy")},
                   device=runs[first].data.tags.get("device", "an unknown device"), post_runs=post_ids)
    res.targets, res.to_target = compute_to_target(res)
    return res


def compute_to_target(res: Evidence) -> tuple[dict, pd.DataFrame]:
    """Targets (the diffusion and random inits' final values of the mean curve) and, per method,
    init and target, where each init's mean curve and each seed's curve reach it."""
    targets, rows = {}, []
    for metric in (res.metric, res.metric_1step):
        for method in res.methods:
            mean = res.mean[res.mean.method == method].sort_values("step")
            for target_init in TARGETS:
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


def _at_floor(res: Evidence, target: float) -> bool:
    return res.floor is not None and target <= FLOOR_MARGIN * res.floor


def _floor_text(res: Evidence, target: float) -> str:
    return (f"the target ({target:.3g}) is within {FLOOR_MARGIN}x the metric's noise floor ({res.floor:.3g}): "
            "reaching it cannot be told from sampling noise")


def _unreached(res: Evidence, target: float, cmt: pd.Series) -> tuple[str, str] | None:
    """(verdict, what was measured) where the compute ratio cannot decide: a target at the noise
    floor, or a CMT mean curve that never got there."""
    if _at_floor(res, target):
        return NOT_RESOLVED, _floor_text(res, target)
    if pd.isna(cmt["total_hours"]):
        return FAILS, "the CMT init's mean curve never reached the target"
    return None


def _ratio(a, b) -> float:
    return float("nan") if a is None or b is None or pd.isna(a) or pd.isna(b) or not b else float(a) / float(b)


def _less(saving: float) -> str:
    if pd.isna(saving):  # a ratio over zero: the init compared against needed none of it
        return "no comparable share of (the other init needed none)"
    return f"{saving:.0%} less" if saving >= 0 else f"{-saving:.0%} more"


def claim_cmt_vs_diffusion(res: Evidence, method: str) -> dict:
    """Claim 1: from CMT, post-training reaches the diffusion init's final quality with less total compute."""
    claim = {"id": 1, "method": method, "claim": f"{methods.label(method)} from CMT reaches the diffusion init's final "
                                                 f"`{res.metric}` with less total compute than from diffusion"}
    target = res.targets[method, "diffusion", res.metric]
    cmt, diff = (_row(res, res.metric, method, "diffusion", i) for i in ("cmt", "diffusion"))
    if undecided := _unreached(res, target, cmt):
        return {**claim, "verdict": undecided[0], "measured": undecided[1]}
    total, post = _ratio(cmt["total_hours"], diff["total_hours"]), _ratio(cmt["posttrain_hours"], diff["posttrain_hours"])
    verdict = NOT_RESOLVED if abs(total - 1) < TIME_TIE else HOLDS if total < 1 else FAILS
    already = cmt["images"] == 0
    return {**claim, "verdict": verdict, "ratio_total": total, "ratio_posttrain": post,
            "measured": f"CMT / diffusion total compute to target = {total:.2f} (post-training only: {post:.2f}"
                        + ("; the CMT init met the target before any post-training" if already else "")
                        + f"; CMT seeds reaching it: {cmt['seeds_reached']}/{cmt['seeds']})"
                        + (f"; within {TIME_TIE:.0%} of 1, the wall-time noise" if verdict == NOT_RESOLVED else "")}


def claim_cmt_vs_random(res: Evidence, method: str) -> dict:
    """Claim 2: the paper's 'up to 98% less data and GPU time' than training without CMT, read as
    CMT's data and compute to reach the random init's final quality versus the random init's."""
    claim = {"id": 2, "method": method, "claim": f"{methods.label(method)} from CMT reaches the random init's final "
                                                 f"`{res.metric}` with less data and compute than from random"}
    target = res.targets[method, "random", res.metric]
    cmt, rnd = (_row(res, res.metric, method, "random", i) for i in ("cmt", "random"))
    if undecided := _unreached(res, target, cmt):
        return {**claim, "verdict": undecided[0], "measured": undecided[1]}
    data = 1 - _ratio(cmt["images"], rnd["images"])
    post = 1 - _ratio(cmt["posttrain_hours"], rnd["posttrain_hours"])
    total = 1 - _ratio(cmt["total_hours"], rnd["total_hours"])
    verdict = NOT_RESOLVED if abs(total) < TIME_TIE else HOLDS if total > 0 else FAILS
    return {**claim, "verdict": verdict, "saving_data": data, "saving_posttrain": post, "saving_total": total,
            "measured": f"from CMT: {_less(data)} post-training data, {_less(post)} post-training time, "
                        f"{_less(total)} total time (incl. pre-, trajectory and mid-training) than from random "
                        f"(paper: {methods.get(method).saving or 'no figure'})"}


def claim_from_scratch(res: Evidence, method: str) -> dict:
    """Claim 3 (the paper's for MeanFlow): from CMT vs from scratch, about half the total training
    time to equal or better 1-step quality."""
    metric, m = res.metric_1step, methods.get(method)
    claim = {"id": 3, "method": method, "claim": f"{m.label} from CMT reaches the from-scratch (random init) "
                                                 f"final 1-step `{metric}` with {m.saving} total time, "
                                                 f"ending equal or better"}
    if method not in res.methods:
        return {**claim, "verdict": NOT_TESTED, "measured": f"{m.label} was not run (posttrain.methods)"}
    target = res.targets[method, "random", metric]
    cmt, rnd = (_row(res, metric, method, "random", i) for i in ("cmt", "random"))
    finals = res.finals[res.finals.method == method].groupby("init")[f"eval_{metric}"].mean()
    better = finals["cmt"] <= finals["random"]
    final_text = (f"final 1-step `{key(metric, res.final_n)}` CMT {finals['cmt']:.3g} vs scratch "
                  f"{finals['random']:.3g} (paper: {m.from_scratch})")
    if undecided := _unreached(res, target, cmt):
        return {**claim, "verdict": undecided[0], "measured": f"{undecided[1]}; {final_text}"}
    saving = 1 - _ratio(cmt["total_hours"], rnd["total_hours"])
    verdict = NOT_RESOLVED if abs(saving) < TIME_TIE else HOLDS if saving > 0 and better else FAILS
    return {**claim, "verdict": verdict, "saving_total": saving, "cmt_final_not_worse": bool(better),
            "measured": f"total time to the target: {_less(saving)} than from scratch (paper: {m.saving}); "
                        + final_text}


def claim_sensitivity() -> dict:
    return {"id": 4, "method": "all", "claim": "CMT makes post-training less sensitive to hyperparameters",
            "verdict": NOT_TESTED, "measured": "needs the Optuna sensitivity study (not run in this pipeline yet)"}


def claims(res: Evidence) -> list[dict]:
    return [*(claim_cmt_vs_diffusion(res, m) for m in res.methods), *(claim_cmt_vs_random(res, m) for m in res.methods),
            *(claim_from_scratch(res, m) for m, spec in methods.REGISTRY.items() if spec.from_scratch),
            claim_sensitivity()]
