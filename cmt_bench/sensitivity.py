"""Claim 4, hyperparameter sensitivity, from Optuna studies: one study per init (random, diffusion,
cmt), the same number of trials over the same search space, objective = a final metric (lower is
better). Tables of the trials and of their spread, parameter importances, a bootstrap verdict, and
seaborn figures.

An init is less sensitive when more of its finished trials land within report.within_best of its own best
value: a flat landscape forgives a poor guess. Pruned and diverged trials never count as within,
so an init that is only good when it survives does not look robust. That relative measure decides
the verdict. Beside it, an absolute one: the share of trials reaching a common target (within
report.within_best of the worse of the two inits' bests), which credits an init whose typical trial beats the
other's best, and which the relative measure cannot see; it is reported, not voted.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from optuna.importance import (FanovaImportanceEvaluator, PedAnovaImportanceEvaluator,  # noqa: E402
                               get_param_importances)
from optuna.trial import TrialState  # noqa: E402

from . import inits  # noqa: E402
from .config import ReportConfig  # noqa: E402
from .verdicts import FAILS, HOLDS, NO_COMPARISON, NOT_RESOLVED, NOT_TESTED, TOO_FEW_TRIALS  # noqa: E402

WITHIN = ReportConfig().within_best  # "within 10% of best" (report.within_best)
BASE = ["init", "number", "state", "value", "diverged", "pruned", "retried_from", "duration_seconds"]
FINISHED = ("COMPLETE", "PRUNED")  # FAIL trials are retried as new trials, so they are not outcomes
EVALUATORS = {"ped_anova": lambda: PedAnovaImportanceEvaluator(), "fanova": lambda: FanovaImportanceEvaluator(seed=0)}


# --- tables -----------------------------------------------------------------------------------

def _row(init: str, t: optuna.trial.FrozenTrial) -> dict:
    diverged = t.state == TrialState.PRUNED and bool(t.user_attrs.get("diverged", False))
    return {"init": init, "number": t.number, "state": t.state.name,
            "value": t.value if t.state == TrialState.COMPLETE else np.nan,
            "diverged": diverged, "pruned": t.state == TrialState.PRUNED and not diverged,
            "retried_from": t.system_attrs.get("failed_trial"),
            "duration_seconds": t.duration.total_seconds() if t.duration else np.nan, **t.params}


def trials_frame(studies: Mapping[str, optuna.Study]) -> pd.DataFrame:
    """One row per trial of every init's study (RUNNING and WAITING ones are not outcomes yet):
    the BASE columns, then one column per param (dotted name)."""
    rows = [_row(init, t) for init, study in studies.items() for t in study.get_trials(deepcopy=False)
            if t.state.is_finished()]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=BASE + [c for c in frame.columns if c not in BASE])
    frame = frame.astype({"value": float, "duration_seconds": float, "diverged": bool, "pruned": bool,
                          "retried_from": "Int64"})
    metrics = {s.user_attrs.get("metric") for s in studies.values()}
    if len(metrics) == 1 and None not in metrics:  # labels the figures
        frame.attrs["metric"] = metrics.pop()
    return frame


def _order(frame: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(frame["init"]))
    return [i for i in inits.names() if i in present] + [i for i in present if i not in inits.names()]


def _params(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in BASE]


def _is_numeric(col: pd.Series) -> bool:
    values = col.dropna()
    return len(values) > 0 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _finished(frame: pd.DataFrame, init: str) -> pd.DataFrame:
    return frame[(frame["init"] == init) & frame["state"].isin(FINISHED)]


def _reach(values: np.ndarray, target: float) -> np.ndarray:
    """Along the last axis: the fraction of finished trials at or below `target`; NaN never is."""
    return (np.where(np.isnan(values), np.inf, values) <= target).mean(axis=-1)


def _within(values: np.ndarray, within: float) -> np.ndarray:
    """Along the last axis: the fraction of finished trials within `within` of their best value;
    NaN (pruned, diverged) is never within."""
    v = np.where(np.isnan(values), np.inf, values)
    best = v.min(axis=-1, keepdims=True)
    return ((v <= best * (1 + within)) & np.isfinite(v)).mean(axis=-1)


def spread(frame: pd.DataFrame, within: float = WITHIN) -> pd.DataFrame:
    """Per init: counts of finished trials and their outcomes, best and median completed value,
    within_best and diverged_fraction (both over finished trials)."""
    rows = {}
    for init in _order(frame):
        fin = _finished(frame, init)
        done, n = fin["value"].dropna(), len(fin)
        rows[init] = {"finished": n, "completed": len(done), "pruned": int(fin["pruned"].sum()),
                      "diverged": int(fin["diverged"].sum()), "best": done.min(), "median": done.median(),
                      "within_best": float(_within(fin["value"].to_numpy(float), within)) if n else np.nan,
                      "diverged_fraction": fin["diverged"].sum() / n if n else np.nan}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("init")


def counted(frame: pd.DataFrame, trials: int) -> pd.DataFrame:
    """The trials the analysis counts: per init, the first `trials` finished ones by trial number.
    Parallel workers can finish one or two more than asked (each checks the count as it starts a
    trial); cutting at the spec's count keeps the statistics independent of worker timing."""
    out = frame[frame["state"].isin(FINISHED)].sort_values(["init", "number"]).groupby("init", sort=False).head(trials)
    out.attrs = dict(frame.attrs)
    return out


def _quiet_study(direction) -> optuna.Study:
    """An in-memory study, without Optuna's INFO line for each (one per init in the stage's log)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(level)


def importances(studies: Mapping[str, optuna.Study], numbers: Mapping[str, Iterable[int]] | None = None) -> pd.DataFrame:
    """Long table (init, evaluator, param, importance), normalized per init and evaluator; over the
    trials `numbers` names per init (see `counted`), or all of them."""
    rows = []
    for init, study in studies.items():
        if numbers is not None:  # the counted trials, in a study of their own (in memory)
            keep = set(numbers.get(init, ()))
            copy = _quiet_study(study.direction)
            copy.add_trials([t for t in study.get_trials(deepcopy=False) if t.number in keep])
            study = copy
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
            continue
        for name, make in EVALUATORS.items():
            try:
                imp = get_param_importances(study, evaluator=make())
            except (RuntimeError, ValueError):  # e.g. fANOVA on equal values: zero variance in all trees
                continue
            rows += [{"init": init, "evaluator": name, "param": p, "importance": float(v)} for p, v in imp.items()]
    return pd.DataFrame(rows, columns=["init", "evaluator", "param", "importance"])


# --- the claim --------------------------------------------------------------------------------

def _verdict(comparisons: dict, diverged_margin: float) -> str:
    c = comparisons.values()
    if any(x["difference"] <= 0 or x["cmt_diverged"] > x["other_diverged"] + diverged_margin for x in c):
        return FAILS
    if all(x["ci90"][0] > 0 and x["cmt_diverged"] <= x["other_diverged"] for x in c):
        return HOLDS
    return NOT_RESOLVED  # CMT ahead, but not beyond resampling noise (or diverges slightly more)


def sensitivity_claim(frame: pd.DataFrame, rules: ReportConfig = ReportConfig(), seed: int = 0) -> dict:
    """Claim 4: S(init) = share of finished trials within rules.within_best of that init's best; CMT
    should have the larger S against every other init, beyond a bootstrap 90% interval, without
    diverging more often. Returns the verdict code, the reason where it could not decide, the
    comparisons and the facts the report words (`claim_text`)."""
    within = rules.within_best
    s = spread(frame, within)
    others = [i for i in s.index if i != "cmt"]  # every other init the study ran, in registry order
    facts = {"within": within, "min_trials": rules.min_trials,
             "inits": {i: {"finished": int(s.at[i, "finished"]), "within_best": float(s.at[i, "within_best"]),
                           "diverged_fraction": float(s.at[i, "diverged_fraction"]), "best": float(s.at[i, "best"]),
                           "median": float(s.at[i, "median"])} for i in s.index}}
    if "cmt" not in s.index or not others:
        return {"verdict": NOT_TESTED, "reason": NO_COMPARISON, "comparisons": {}, "facts": facts}
    few = [i for i in ["cmt", *others] if s.at[i, "finished"] < rules.min_trials]
    if few:
        return {"verdict": NOT_TESTED, "reason": TOO_FEW_TRIALS, "comparisons": {}, "facts": {**facts, "few": few}}
    rng = np.random.default_rng(seed)
    values = {i: _finished(frame, i)["value"].to_numpy(float) for i in ["cmt", *others]}
    # bootstrap: resample each init's finished trials (a best is recomputed inside each resample)
    boot = {i: v[rng.integers(0, len(v), size=(rules.resamples, len(v)))] for i, v in values.items()}
    comparisons = {}
    for other in others:
        lo, hi = np.percentile(_within(boot["cmt"], within) - _within(boot[other], within), [5, 95])
        cmt, oth = float(s.at["cmt", "within_best"]), float(s.at[other, "within_best"])  # plain floats: JSON
        bests = [b for b in (s.at["cmt", "best"], s.at[other, "best"]) if b == b]  # NaN: nothing completed
        target = float((1 + within) * max(bests)) if bests else np.nan  # within of the worse best
        reach = {i: float(_reach(values[i], target)) for i in ("cmt", other)}
        reach_lo, reach_hi = np.percentile(_reach(boot["cmt"], target) - _reach(boot[other], target), [5, 95])
        comparisons[other] = {"cmt": cmt, "other": oth, "difference": cmt - oth, "ci90": [float(lo), float(hi)],
                              "cmt_diverged": float(s.at["cmt", "diverged_fraction"]),
                              "other_diverged": float(s.at[other, "diverged_fraction"]),
                              "target": target, "cmt_reach": reach["cmt"], "other_reach": reach[other],
                              "reach_difference": reach["cmt"] - reach[other],
                              "reach_ci90": [float(reach_lo), float(reach_hi)]}
    return {"verdict": _verdict(comparisons, rules.diverged_margin), "reason": None, "comparisons": comparisons,
            "facts": facts}


# --- figures ----------------------------------------------------------------------------------

def _colors(order: list[str]) -> dict:
    return {i: inits.color(i) for i in order}


def _log_y(ax, values: pd.Series) -> None:
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale("log")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_slices(frame: pd.DataFrame, path: Path, log_params: Iterable[str] = ()) -> Path:
    """One panel per param: completed trials' final values against the param's value, one colour
    per init; pruned and diverged trials as small x at the top edge."""
    params, log_params, order = _params(frame), set(log_params), _order(frame)
    data = frame.assign(**{p: frame[p].astype(str) for p in params if not _is_numeric(frame[p])})
    done, stopped = data[data["state"] == "COMPLETE"], data[data["diverged"] | data["pruned"]]
    ncols = min(3, max(1, len(params)))
    nrows = -(-max(1, len(params)) // ncols)
    sns.set_style("whitegrid")
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for i, (ax, param) in enumerate(zip(axes.flat, params)):
        if len(done):
            sns.scatterplot(data=done, x=param, y="value", hue="init", hue_order=order, palette=_colors(order),
                            s=24, alpha=0.8, ax=ax, legend=i == 0)
        for init, d in stopped.groupby("init"):  # no final value: mark where they were tried
            ax.scatter(d[param], np.full(len(d), 0.97), transform=ax.get_xaxis_transform(), marker="x", s=14,
                       c=inits.color(init), lw=1, clip_on=False)
        if param in log_params:
            ax.set_xscale("log")
        _log_y(ax, done["value"])
        ax.set(xlabel=param, ylabel=frame.attrs.get("metric", "final value"))
    for ax in axes.flat[len(params):]:
        ax.set_axis_off()
    fig.suptitle("final value of each trial per hyperparameter (lower is better); x at the top: pruned or diverged")
    fig.tight_layout()
    return _save(fig, path)


def _top_two(frame: pd.DataFrame, imp: pd.DataFrame) -> list[str] | None:
    """The two most important numeric params: fANOVA, then PED-ANOVA, then column order."""
    numeric = [p for p in _params(frame) if _is_numeric(frame[p])]
    if len(numeric) < 2:
        return None
    ranked = []
    for name in ("fanova", "ped_anova"):
        mean = imp[imp["evaluator"] == name].groupby("param")["importance"].mean().sort_values(ascending=False)
        ranked += [p for p in mean.index if p in numeric and p not in ranked]
    return (ranked + [p for p in numeric if p not in ranked])[:2]


def plot_contours(frame: pd.DataFrame, imp: pd.DataFrame, path: Path, log_params: Iterable[str] = ()) -> Path | None:
    """One panel per init: the final value over the two most important params (log params in
    log10), filled contours where >= 6 distinct completed points exist, the trials on top."""
    pair = _top_two(frame, imp)
    if pair is None:
        return None
    log_params, order = set(log_params), _order(frame)
    sns.set_style("whitegrid")
    axis = {p: (f"log10 {p}" if p in log_params else p) for p in pair}
    data = frame.dropna(subset=pair).assign(**{axis[p]: lambda f, p=p: np.log10(f[p].astype(float))
                                               if p in log_params else f[p].astype(float) for p in pair})
    x, y = axis[pair[0]], axis[pair[1]]
    done = data[data["state"] == "COMPLETE"]
    lo, hi = done["value"].min(), done["value"].max()
    log = bool(lo > 0 and hi / lo > 10)
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi)
    fig, axes = plt.subplots(1, len(order), figsize=(4.4 * len(order) + 1.2, 4.2), squeeze=False, sharex=True,
                             sharey=True, layout="constrained")
    for ax, init in zip(axes[0], order):
        d = done[done["init"] == init]
        pts = d.groupby([x, y])["value"].mean().reset_index()  # one height per distinct point
        if len(pts) >= 6 and hi > lo:
            try:
                ax.tricontourf(pts[x], pts[y], pts["value"], levels=(np.geomspace if log else np.linspace)(lo, hi, 13),
                               norm=norm, cmap="viridis", alpha=0.85)
            except (ValueError, RuntimeError):  # collinear points: no triangulation
                pass
        sns.scatterplot(data=d, x=x, y=y, color=inits.color(init), edgecolor="w", s=30, ax=ax)
        stopped = data[(data["init"] == init) & (data["diverged"] | data["pruned"])]
        ax.scatter(stopped[x], stopped[y], marker="x", c="k", s=16, lw=1)
        ax.set_title(f"{init} init ({len(d)} completed; x: pruned or diverged)", fontsize=9)
    if len(done):
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes[0].tolist(),
                     label=f"{frame.attrs.get('metric', 'final value')} (lower is better)")
    fig.suptitle("final value over the two most important hyperparameters")
    return _save(fig, path)


def plot_spread(frame: pd.DataFrame, path: Path, within: float = WITHIN) -> Path:
    """Final values of the completed trials per init (box + points), each init's best as a star,
    its 'within `within` of best' band shaded."""
    order, s = _order(frame), spread(frame, within)
    done = frame[frame["state"] == "COMPLETE"]
    sns.set_style("whitegrid")
    fig, ax = plt.subplots(figsize=(2.2 * max(1, len(order)) + 2.5, 4.6))
    if len(done):
        kw = dict(data=done, x="init", y="value", order=order, hue="init", hue_order=order, palette=_colors(order),
                  legend=False, ax=ax)
        sns.boxplot(**kw, fill=False, showfliers=False, width=0.5)
        state = np.random.get_state()  # seaborn jitters from numpy's global generator: seed it, so reruns match
        np.random.seed(0)
        sns.stripplot(**kw, size=4, alpha=0.7, jitter=0.2)
        np.random.set_state(state)
    for i, init in enumerate(order):
        best = s.at[init, "best"]
        if not np.isnan(best):
            color = inits.color(init)
            ax.fill_between([i - 0.42, i + 0.42], best, best * (1 + within), color=color, alpha=0.2, lw=0)
            ax.plot(i, best, marker="*", ms=14, c=color, mec="k")
    ax.set_xticks(range(len(order)), [f"{i}\n{s.at[i, 'within_best']:.0%} within {within:.0%} of best\n"
                                      f"{s.at[i, 'completed']} completed, {s.at[i, 'pruned']} pruned, "
                                      f"{s.at[i, 'diverged']} diverged" for i in order], fontsize=8)
    _log_y(ax, done["value"])
    ax.set(xlabel="", ylabel=frame.attrs.get("metric", "final value"))
    ax.set_title(f"final value per trial (lower is better); star: best, band: within {within:.0%} of best")
    fig.tight_layout()
    return _save(fig, path)
