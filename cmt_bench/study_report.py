"""The report's sensitivity part: for each study the `studies@<name>` stages ran (artifacts/studies/), the
spread of trial outcomes per init, parameter importances, seaborn figures under
reports/<preset>/studies/<name>/, and claim 4's verdict."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import sensitivity
from .data import read_json
from .config import ReportConfig
from .layout import STUDIES, STUDY_INDEX
from .methods import label


def study_names() -> list[str]:
    return read_json(STUDY_INDEX)["specs"] if STUDY_INDEX.exists() else []


def _load(name: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The study's summary, its counted trials (the first spec.trials finished per init) and importances."""
    folder = STUDIES / name
    summary, frame = read_json(folder / "study.json"), pd.read_csv(folder / "trials.csv")
    frame.attrs["metric"] = summary["final_key"]  # the figures' axis label
    return summary, sensitivity.counted(frame, summary["spec"]["trials"]), pd.read_csv(folder / "importances.csv")


def _log_params(summary: dict) -> list[str]:
    return [k for k, d in summary["spec"]["space"].items() if d.get("log")]


def _claim(summary: dict, frame: pd.DataFrame, rules: ReportConfig) -> dict:
    """Claim 4 from one study, as data (claim_text words it)."""
    spec = summary["spec"]
    found = sensitivity.sensitivity_claim(frame, rules)
    return {"id": 4, "method": spec["method"], "study": spec["name"], **found,
            # flat numbers for `dvc metrics show`
            **{f"within_best_{i}": float(v) for i, v in sensitivity.spread(frame, rules.within_best)["within_best"].items()},
            **{f"difference_vs_{o}": c["difference"] for o, c in found["comparisons"].items()},
            **{f"reach_difference_vs_{o}": c["reach_difference"] for o, c in found["comparisons"].items()}}


def _fmt(x) -> str:
    return "–" if pd.isna(x) else f"{x:.4g}"


def _section(summary: dict, frame: pd.DataFrame, imp: pd.DataFrame, figures: dict[str, Path | None],
             rel: str, within: float) -> list[str]:
    spec, spread = summary["spec"], sensitivity.spread(frame, within)
    space = ", ".join(f"`{k}` " + (f"in {d['choices']}" if "choices" in d else
                                   f"{d['low']:g} to {d['high']:g}{' (log)' if d.get('log') else ''}")
                      for k, d in spec["space"].items())
    minutes = summary["wall_seconds"] / 60 if summary.get("wall_seconds") else float("nan")
    lines = [f"### Study `{spec['name']}`: {label(spec['method'])}", "",
             f"{spec['trials']} trials per init ({', '.join(spec['inits'])}), {spec['sampler']} sampler, pruner "
             f"{spec['pruner']['kind']}, post-training seed {spec['seed']}, {spec['objective']['budget_images']:,} "
             f"images per trial. Objective: `{summary['final_key']}` after the budget (lower is better). "
             f"Space: {space}. Storage `{summary['storage']}`, {summary['workers']} worker(s), "
             f"{minutes:.1f} min from the first trial's start to the last trial's end.", "",
             f"| init | finished | completed | pruned | diverged | best | median | median / best | within "
             f"{within:.0%} of best |", "|---|---|---|---|---|---|---|---|---|"]
    for init, row in spread.iterrows():
        counts = " | ".join(str(int(row[k])) for k in ("finished", "completed", "pruned", "diverged"))
        lines.append(f"| {init} | {counts} | "
                     f"{_fmt(row['best'])} | {_fmt(row['median'])} | {_fmt(row['median'] / row['best'])} | "
                     f"{row['within_best']:.0%} |")
    lines.append("")
    if not imp.empty:
        table = imp.pivot_table(index="param", columns=["evaluator", "init"], values="importance")
        cols = list(table.columns)
        lines += ["Parameter importances (Optuna; normalized per init and evaluator):", "",
                  "| parameter | " + " | ".join(f"{e} {i}" for e, i in cols) + " |",
                  "|---|" + "---|" * len(cols),
                  *[f"| `{p}` | " + " | ".join(_fmt(table.at[p, c]) for c in cols) + " |" for p in table.index], ""]
    for title, path in figures.items():
        if path is not None:
            lines += [f"![{title}]({rel}/{path.name})", ""]
    return lines


def build(out: Path, rules: ReportConfig = ReportConfig()) -> tuple[list[dict], list[str]]:
    """Claim 4 per study and the report's sensitivity section; figures go to out/studies/<name>/."""
    claims, lines = [], []
    for name in study_names():
        summary, frame, imp = _load(name)
        folder = out / "studies" / name
        folder.mkdir(parents=True, exist_ok=True)
        logs = _log_params(summary)
        figures = {"final metric per trial, per init": sensitivity.plot_spread(frame, folder / "spread.png",
                                                                               rules.within_best),
                   "final metric against each parameter": sensitivity.plot_slices(frame, folder / "slices.png", logs),
                   "final metric over the two most important parameters":
                       sensitivity.plot_contours(frame, imp, folder / "contours.png", logs)}
        frame.to_csv(folder / "trials.csv", index=False)
        claims.append(_claim(summary, frame, rules))
        lines += _section(summary, frame, imp, figures, f"studies/{name}", rules.within_best)
    if lines:
        lines = ["## Sensitivity to hyperparameters (Optuna)", "",
                 f"An init is less sensitive when more of its finished trials end within "
                 f"{rules.within_best:.0%} of its own best value; pruned and diverged trials never count as "
                 "within. Each init counts its first finished trials up to the spec's number (by trial number; "
                 "parallel workers may finish one or two more, which are not counted). "
                 "Claim 4 compares CMT's share with each other init's, with a bootstrap 90% interval. "
                 "The band is relative: an init with a lower best gets a narrower band in absolute terms, so read "
                 "it with the median / best column and the metric's noise floor.", "",
                 *lines]
    return claims, lines
