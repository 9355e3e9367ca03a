"""Ablations: one factor of the CMT pipeline at several levels, everything else fixed, each level a
DVC experiment (`dvc exp run --queue -S factor=level`, then `dvc queue start -j N`), and a report
per spec from the experiments' own report outputs (which the report stage built from MLflow).

A spec (`experiments/ablations/<name>.yaml`) names the preset, the factor (a dotted parameter such
as trajectories.steps), its levels, the post-training method whose CMT-init result is compared,
and `fixed` overrides applied at every level (e.g. fewer seeds, no study).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402
from pydantic import Field, ValidationError  # noqa: E402

from . import methods  # noqa: E402
from .config import METHODS, Params, ParamsError, Section, flatten, override  # noqa: E402
from .layout import ABLATION_REPORTS as REPORTS  # noqa: E402
from .layout import ABLATION_SPECS as ABLATIONS_DIR  # noqa: E402


class AblationSpec(Section):
    name: str = ""  # from the file name
    preset: str
    factor: str  # a dotted parameter, e.g. trajectories.steps
    levels: list[Any] = Field(min_length=2)
    method: str = "ect"  # whose CMT-init post-training is compared across levels
    fixed: dict = {}  # overrides applied at every level

    def overrides(self, level) -> dict:
        """The -S assignments of one level: the fixed overrides, then the factor."""
        return {**flatten(self.fixed), self.factor: level}

    def exp_name(self, level) -> str:
        return f"{self.name}-{re.sub(r'[^A-Za-z0-9_.]+', '_', str(level))}".replace("..", "_")


def load_spec(name_or_path: str, params: Params, root: Path = Path(".")) -> AblationSpec:
    """Read and validate a spec against params.yaml: every level must give valid parameters."""
    path = Path(name_or_path) if name_or_path.endswith((".yaml", ".yml")) else root / ABLATIONS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / ABLATIONS_DIR).glob("*.yaml"))
        raise ParamsError(f"ablation spec {name_or_path!r} not found at {path}; known: {', '.join(known) or 'none'}")
    try:
        spec = AblationSpec.model_validate({**(yaml.safe_load(path.read_text()) or {}), "name": path.stem})
    except (ValidationError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: {exc}") from None
    errors = []
    if spec.preset != params.preset:
        errors.append(f"preset: the ablation is for preset {spec.preset!r}, params.yaml holds {params.preset!r}")
    if spec.factor not in flatten(params):
        errors.append(f"factor: {spec.factor!r} is not a parameter (e.g. trajectories.steps, trajectories.solver, "
                      f"midtrain.train.budget_images, midtrain.distance.kind, posttrain.train.budget_images)")
    if spec.method not in METHODS:
        errors.append(f"method: {spec.method!r}; allowed: {', '.join(METHODS)}")
    if len(set(map(str, spec.levels))) != len(spec.levels):
        errors.append("levels: list each level once")
    if not errors:
        for level in spec.levels:
            try:
                p = override(params, spec.overrides(level), f"{path} level {level!r}")
            except ParamsError as exc:
                errors.append(f"levels: {level!r} gives invalid parameters: {str(exc).splitlines()[-1].strip(' -')}")
                continue
            if spec.method not in p.posttrain.methods:
                errors.append(f"method: {spec.method!r} is not in posttrain.methods at level {level!r}")
    if errors:
        raise ParamsError(f"{path}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))
    return spec


# --- running through DVC experiments -----------------------------------------------------------

def _dvc(*args: str, env: dict | None = None) -> str:
    """This environment's DVC, with its bin folder first on PATH: queued experiments run each stage as
    `python -m cmt_bench`, which must find this environment's Python even when it is not activated."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    out = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out.stdout


def experiments() -> dict[str, str]:
    """Finished DVC experiments of this repo, on any baseline commit, by name: their git revision."""
    found = {}
    for line in _dvc("exp", "list", "--all-commits").splitlines():
        match = re.match(r"\s+([0-9a-f]{7,40}) \[(.+)\]$", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def _in_queue() -> set[str]:
    """Experiments queued or running now."""
    return {m.group(1) for m in re.finditer(r"^\S+\s+(\S+)\s.*\b(Queued|Running)\b", _dvc("queue", "status"), re.M)}


def queue(spec: AblationSpec, force: bool = False) -> list[str]:
    """Queue one DVC experiment per level that has none yet (every level with `force`: each
    stage reruns, so no compute figure comes from DVC's run-cache of an earlier run); return the
    names queued."""
    existing, queued = set(experiments()) | _in_queue(), []
    for level in spec.levels:
        name = spec.exp_name(level)
        if name in existing and not force:
            print(f"[ablation {spec.name}] {name} exists; kept (--force reruns it)", file=sys.stderr)
            continue
        sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in spec.overrides(level).items()]
        _dvc("exp", "run", "--queue", *(["--force"] if force else []), "-n", name, *(a for s in sets for a in ("-S", s)))
        queued.append(name)
    return queued


def run(spec: AblationSpec, jobs: int, force: bool = False) -> None:
    """Queue the levels, run the queue with `jobs` workers and wait for it to drain."""
    if queue(spec, force):
        # experiments share the cores: torch threads beyond them made two toy experiments ~10x slower
        # each (measured: 2.5 min per post-training cell instead of 15 s), so split the cores
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
        _dvc("queue", "start", "-j", str(jobs), env={**os.environ, "OMP_NUM_THREADS": threads})
        while _in_queue():
            time.sleep(5)
    missing = [spec.exp_name(level) for level in spec.levels if spec.exp_name(level) not in experiments()]
    if missing:
        raise RuntimeError(f"ablation {spec.name}: experiment(s) {', '.join(missing)} did not finish; "
                           f"see `dvc queue logs <name>`")


# --- the report ---------------------------------------------------------------------------------

def _finals(rev: str, preset: str) -> pd.DataFrame:
    """The level's per-seed final metrics and compute, from the report stage's finals.csv in the
    experiment's commit."""
    text = subprocess.run(["git", "show", f"{rev}:reports/{preset}/finals.csv"], capture_output=True, text=True)
    if text.returncode != 0:
        raise RuntimeError(f"experiment {rev[:8]} has no reports/{preset}/finals.csv: did its pipeline finish?")
    return pd.read_csv(io.StringIO(text.stdout))


def _stage_hours(rev: str, stage: str) -> float:
    """Measured device-hours of an upstream stage of the experiment, from its run.json in the DVC cache."""
    import dvc.api
    return json.loads(dvc.api.read(f"artifacts/{stage}/run.json", rev=rev))["ledger"]["device_hours"]


def collect(spec: AblationSpec, metric: str) -> pd.DataFrame:
    """One row per level x seed of the CMT init: final metric and measured device-hours per stage
    (teacher, trajectories, mid-training, post-training)."""
    exps, rows = experiments(), []
    for level in spec.levels:
        name = spec.exp_name(level)
        if name not in exps:
            raise RuntimeError(f"ablation {spec.name}: no finished DVC experiment {name}; "
                               f"run `cmt-bench ablation run {spec.name}`")
        finals = _finals(exps[name], spec.preset)
        cmt = finals[(finals.method == spec.method) & (finals.init == "cmt")]
        upstream = {key: _stage_hours(exps[name], stage) for key, stage in
                    (("teacher_hours", "pretrain"), ("trajectories_hours", "trajectories"),
                     ("midtrain_hours", f"midtrain/{spec.method}"))}
        for _, row in cmt.iterrows():
            rows.append({"level": str(level), "seed": int(row["seed"]), "metric": row[f"eval_{metric}"], **upstream,
                         "posttrain_hours": row["posttrain_hours"], "total_hours": row["total_hours"],
                         "cmt_hours": upstream["trajectories_hours"] + upstream["midtrain_hours"]
                         + row["posttrain_hours"]})
    return pd.DataFrame(rows)


def _sentence(spec: AblationSpec, table: pd.DataFrame, metric: str, time_tie: float) -> str:
    best, worst = table["mean"].idxmin(), table["mean"].idxmax()
    gap = table.at[worst, "mean"] - table.at[best, "mean"]
    spread = table["sd"].max()
    resolved = "larger than" if gap > 2 * spread else "within"
    cheap, dear = table["cmt_hours"].idxmin(), table["cmt_hours"].idxmax()
    ratio = table.at[dear, "cmt_hours"] / table.at[cheap, "cmt_hours"]
    compute = (f"CMT-stage compute (trajectories + mid-training + post-training) runs from "
               f"{table.at[cheap, 'cmt_hours'] * 3600:.3g} device-seconds ({cheap}) to "
               f"{table.at[dear, 'cmt_hours'] * 3600:.3g} ({dear})"
               + (f", within the {time_tie:.0%} of wall-time noise." if ratio < 1 + time_tie else "."))
    return (f"`{spec.factor}` = {best} gives the best final `{metric}` of {methods.label(spec.method)} "
            f"from CMT ({table.at[best, 'mean']:.4g}), {worst} the worst ({table.at[worst, 'mean']:.4g}); the gap "
            f"of {gap:.3g} is {resolved} twice the largest seed sd ({spread:.3g}), so the ranking is "
            f"{'resolved' if resolved == 'larger than' else 'not resolved'} at this scale. {compute}")


def report(spec: AblationSpec, params: Params) -> Path:
    """reports/ablations/<name>/: a table (CSV + Markdown) and a figure of the final metric and the
    compute per level, with the seed spread, and one sentence on what the ablation shows."""
    from .html import render
    metric = params.report_metric
    rows = collect(spec, metric)
    hours = ["teacher_hours", "trajectories_hours", "midtrain_hours", "posttrain_hours", "cmt_hours", "total_hours"]
    table = rows.groupby("level", sort=False).agg(mean=("metric", "mean"), sd=("metric", "std"),
                                                  seeds=("seed", "count"), **{h: (h, "mean") for h in hours})
    table = table.fillna({"sd": 0.0}).astype({"seeds": int})
    out = REPORTS / spec.name
    out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "table.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    sns.pointplot(rows, x="level", y="metric", errorbar=("pi", 100), capsize=0.15, color="#d62728", ax=axes[0])
    sns.stripplot(rows, x="level", y="metric", color="#d62728", alpha=0.4, ax=axes[0])
    axes[0].set(xlabel=spec.factor, ylabel=f"final {metric} (lower is better)",
                title=f"{methods.label(spec.method)} from CMT: mean, min-max over seeds")
    stages = table[["trajectories_hours", "midtrain_hours", "posttrain_hours"]] * 3600
    stages.plot.bar(ax=axes[1], stacked=True, color=["#9467bd", "#ff7f0e", "#d62728"], rot=0)
    axes[1].set(xlabel=spec.factor, ylabel="device-seconds (measured, mean over seeds)",
                title="CMT-stage compute per level")
    axes[1].legend(["trajectories", "mid-training", "post-training"])
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)
    md = [f"# Ablation `{spec.name}`: {spec.factor}", "",
          f"Preset `{spec.preset}`, levels {', '.join(map(str, spec.levels))}, everything else fixed"
          + (f" (at every level: {', '.join(f'`{k}={v}`' for k, v in flatten(spec.fixed).items())})" if spec.fixed else "")
          + f". Each level is the DVC experiment `{spec.name}-<level>`; final metrics and post-training compute "
            "come from each experiment's report (read from MLflow), upstream compute from its stages' run.json; "
            "CMT init only. The teacher does not depend on these factors; where a level retrained it (DVC reruns "
            "a stage whose parameters changed, even if its result cannot), its time is listed but not compared.",
          "", _sentence(spec, table, metric, params.report.time_tie), "",
          f"| {spec.factor} | final {metric} (mean ± sd) | seeds | trajectories | mid-training | post-training | "
          "CMT stages | teacher | total |", "|---|---|---|---|---|---|---|---|---|",
          *[f"| {lvl} | {r['mean']:.4g} ± {r['sd']:.2g} | {int(r['seeds'])} | "
            + " | ".join(f"{r[h] * 3600:.3g}" for h in ("trajectories_hours", "midtrain_hours", "posttrain_hours",
                                                        "cmt_hours", "teacher_hours", "total_hours")) + " |"
            for lvl, r in table.iterrows()],
          "", "Compute columns: measured device-seconds (mean over seeds).",
          "", "![ablation](ablation.png)", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(render(text, out, f"Ablation {spec.name}"))
    return out
