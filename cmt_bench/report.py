"""The report: metric versus measured compute per init, compute to reach a target, the claim row.

Curves come from MLflow (`get_metric_history` on the run ids the stages stored), so the report
and the MLflow UI show the same numbers. Compute for an init counts every stage it depends on:
random = post-training; diffusion = pre-training + post-training; CMT = pre-training +
trajectories + mid-training + post-training.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import metrics  # noqa: E402
from .config import INITS, Params  # noqa: E402
from .data import load_split, read_json, write_json  # noqa: E402
from .stages import out_dir  # noqa: E402
from .tracking import tracking_uri  # noqa: E402

UPSTREAM = {"random": [], "diffusion": ["pretrain"], "cmt": ["pretrain", "trajectories", "midtrain"]}
PAPER = ("Hu et al. 2025 (arXiv 2509.24526): on CIFAR-10, CMT reaches 2-step FID 1.97 with up to 98% less "
         "data and GPU time than consistency models; on ImageNet 256, 1-step FID 3.34 at about half the "
         "training cost of MeanFlow from scratch.")
PALETTE = {"random": "#7f7f7f", "diffusion": "#1f77b4", "cmt": "#d62728"}


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


def _client(params: Params):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri(params))


def load_curves(client, run_ids: dict[str, str], keys: list[str]) -> pd.DataFrame:
    frames = []
    for init, run_id in run_ids.items():
        cols = {}
        for key in keys:
            cols[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        frame = pd.DataFrame(cols).rename_axis("step").reset_index().sort_values("step")
        frames.append(frame.assign(init=init))
    return pd.concat(frames, ignore_index=True)


def collect(params: Params) -> dict:
    """Everything the report shows, read from MLflow via the run ids in the stage outputs."""
    client = _client(params)
    metric = params.report.metric
    stage_hours = {s: client.get_run(read_json(out_dir(s) / "run.json")["run_id"]).data.metrics["device_hours"]
                   for s in ("pretrain", "trajectories", "midtrain")}
    post_runs = {i: read_json(out_dir("posttrain", i) / "run.json")["run_id"] for i in INITS}
    curves = load_curves(client, post_runs, ["device_hours", "images_seen", metric])
    curves["upstream_hours"] = curves["init"].map({i: sum(stage_hours[s] for s in UPSTREAM[i]) for i in INITS})
    curves["total_hours"] = curves["upstream_hours"] + curves["device_hours"]
    final_eval = {i: read_json(out_dir("evaluate", i) / "metrics.json") for i in INITS}
    heldout = load_split(out_dir("data"), "heldout").numpy()

    finals = curves.sort_values("step").groupby("init").last()
    target = float(finals.loc["diffusion", metric])
    rows = []
    for init in INITS:
        curve = curves[curves.init == init].sort_values("step")
        hit = reach(curve, metric, target, ("device_hours", "total_hours", "images_seen"))
        rows.append({
            "init": init,
            "upstream_hours": float(finals.loc[init, "upstream_hours"]),
            "posttrain_hours": float(finals.loc[init, "device_hours"]),
            "total_hours": float(finals.loc[init, "total_hours"]),
            "images_seen": int(finals.loc[init, "images_seen"]),
            f"final_{metric}": float(finals.loc[init, metric]),
            f"eval_{metric}": final_eval[init]["metrics"][metric],
            "posttrain_hours_to_target": hit and hit["device_hours"],
            "total_hours_to_target": hit and hit["total_hours"],
            "images_to_target": hit and hit["images_seen"],
        })
    table = pd.DataFrame(rows).set_index("init")
    return {"metric": metric, "target": target, "curves": curves, "table": table, "stage_hours": stage_hours,
            "eval_samples": final_eval["diffusion"]["samples"], "post_runs": post_runs,
            "floor": noise_floor(params, heldout), "heldout": heldout}


def noise_floor(params: Params, heldout: np.ndarray) -> float | None:
    """The in-loop metric between two disjoint held-out sets of the in-loop size: what a perfect
    sampler would score, so differences of this order between inits are sampling noise."""
    n = params.evaluate.inloop_samples
    if len(heldout) < 2 * n:
        return None
    family = params.report.metric.rsplit("_", 1)[0]  # e.g. sw_2step -> sw
    scores = metrics.score({"floor": heldout[n:2 * n]}, heldout[:n], params.evaluate.sw_projections,
                           params.evaluate.seed)
    return scores[f"{family}_floor"]


def claim_cmt_vs_diffusion(table: pd.DataFrame) -> dict:
    claim = "Post-training from CMT reaches the diffusion-init's final quality with less total compute"
    cmt, diff = table.loc["cmt"], table.loc["diffusion"]
    if pd.isna(cmt["total_hours_to_target"]):
        return {"claim": claim, "verdict": "does not hold at this scale",
                "measured": "the CMT init never reached the target within its post-training budget"}
    total = cmt["total_hours_to_target"] / diff["total_hours_to_target"]
    post = cmt["posttrain_hours_to_target"] / diff["posttrain_hours_to_target"] \
        if diff["posttrain_hours_to_target"] else float("nan")
    verdict = "holds at this scale" if total < 1 else "does not hold at this scale"
    already = cmt["images_to_target"] == 0
    return {"claim": claim, "verdict": verdict, "ratio_total": float(total), "ratio_posttrain": float(post),
            "cmt_met_target_before_posttraining": bool(already),
            "measured": f"CMT total / diffusion total compute to target = {total:.2f} "
                        f"(post-training only: {post:.2f}"
                        + ("; the CMT init met the target before any post-training)" if already else ")")}


def _unit(hours: float) -> tuple[str, float]:
    return ("device-seconds", 3600.0) if hours < 0.5 else ("device-hours", 1.0)


def plot_curves(res: dict, path: Path) -> None:
    curves, metric = res["curves"], res["metric"]
    unit, scale = _unit(curves["total_hours"].max())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (x, label) in zip(axes, [("device_hours", f"post-training {unit}"), ("total_hours", f"total {unit} (incl. upstream stages)"),
                                     ("images_seen", "post-training images seen")]):
        data = curves.assign(x=curves[x] * (scale if x != "images_seen" else 1))
        sns.lineplot(data=data, x="x", y=metric, hue="init", hue_order=list(INITS), palette=PALETTE, marker="o", ax=ax)
        ax.axhline(res["target"], ls="--", c="k", lw=1, label="target (diffusion-init final)")
        if res["floor"] is not None:
            ax.axhline(res["floor"], ls=":", c="0.5", lw=1, label="noise floor (held-out vs held-out)")
        ax.set(xlabel=label, ylabel=metric, yscale="log")
        handles, labels = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{metric} during ECT post-training, one line per init")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(res: dict, heldout: np.ndarray, path: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(14, 7), sharex=True, sharey=True)
    n = res["eval_samples"]
    for row, steps in enumerate(("1step", "2step")):
        axes[row, 0].scatter(*heldout[:n].T, s=1, c="k", alpha=0.4)
        axes[row, 0].set_title(f"held-out data (n={min(n, len(heldout))})" if row == 0 else "held-out data")
        for col, init in enumerate(INITS, start=1):
            x = np.load(out_dir("evaluate", init) / "samples.npz")[steps]
            axes[row, col].scatter(*x.T, s=1, c=PALETTE[init], alpha=0.4)
            axes[row, col].set_title(f"{init} init, {steps.replace('step', '-step')}")
    for ax in axes.flat:
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x, scale=1.0, digits=3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "not reached"
    return f"{x * scale:.{digits}g}"


def _images(x) -> str:
    return "not reached" if x is None or np.isnan(x) else f"{x:,.0f}"


def _floor_line(res: dict) -> list[str]:
    if res["floor"] is None:
        return []
    return [f"Noise floor: two disjoint held-out sets of the in-loop size score `{res['metric']}` = "
            f"{res['floor']:.3g} against each other; differences of that order are sampling noise.", ""]


def markdown(params: Params, res: dict, claim: dict) -> str:
    table, metric = res["table"], res["metric"]
    unit, scale = _unit(table["total_hours"].max())
    sh = res["stage_hours"]
    lines = [
        f"# CMT benchmark report: preset `{params.preset}`", "",
        f"Dataset: `{params.data.dataset}` (2-D toy, {params.data.train_size} train points), "
        f"metric `{metric}` (lower is better; in-loop with {params.evaluate.inloop_samples} samples, final "
        f"evaluation with {res['eval_samples']} samples). Compute is measured wall time of training steps x "
        f"devices ({unit}), not estimated; on a shared machine other load inflates it.", "",
        *_floor_line(res),
        "## Claim", "",
        "| claim | paper | measured | verdict |", "|---|---|---|---|",
        f"| {claim['claim']} | CIFAR-10: up to 98% less data and GPU time (2-step FID 1.97) | {claim['measured']} "
        f"| **{claim['verdict']}** |", "",
        f"Paper: {PAPER}", "",
        f"Scale gap: this run trains a {params.net.depth}-block MLP (width {params.net.hidden}) on 2-D points on a CPU "
        f"for seconds; the paper trains image UNets/DiTs on GPUs for days, so agreement or disagreement here "
        f"says little about the paper's scale.", "",
        f"## Compute to reach the target", "",
        f"Target: the diffusion-init's final in-loop `{metric}` = {res['target']:.4g}. Upstream stages: "
        f"pre-training {_fmt(sh['pretrain'], scale)}, trajectories {_fmt(sh['trajectories'], scale)}, "
        f"mid-training {_fmt(sh['midtrain'], scale)} {unit}.", "",
        f"| init | post-training {unit} to target | total {unit} to target | images to target | "
        f"post-training {unit} (all) | total {unit} (all) | final `{metric}` (in-loop) | final `{metric}` "
        f"({res['eval_samples']} samples) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for init, row in table.iterrows():
        lines.append(f"| {init} | {_fmt(row['posttrain_hours_to_target'], scale)} | "
                     f"{_fmt(row['total_hours_to_target'], scale)} | {_images(row['images_to_target'])} | "
                     f"{_fmt(row['posttrain_hours'], scale)} | {_fmt(row['total_hours'], scale)} | "
                     f"{row[f'final_{metric}']:.4g} | {row[f'eval_{metric}']:.4g} |")
    lines += ["", "## Figures", "", "![metric versus compute](metric_vs_compute.png)", "",
              "![samples](samples.png)", "",
              "MLflow runs of post-training: " + ", ".join(f"{i} `{r}`" for i, r in res["post_runs"].items()), ""]
    return "\n".join(lines)


def summary_lines(params: Params, res: dict, claim: dict) -> list[str]:
    table, metric = res["table"], res["metric"]
    unit, scale = _unit(table["total_hours"].max())
    lines = [f"{'init':<10} {'post-train ' + unit:>26} {'total ' + unit:>21} {'final ' + metric:>16}"]
    for init, row in table.iterrows():
        lines.append(f"{init:<10} {row['posttrain_hours'] * scale:>26.3g} {row['total_hours'] * scale:>21.3g} "
                     f"{row[f'eval_{metric}']:>16.4g}")
    lines.append(f"claim 1: {claim['verdict']} ({claim['measured']})")
    return lines


def report_dir(params: Params) -> Path:
    return Path("reports") / params.preset


def build(params: Params) -> Path:
    res = collect(params)
    claim = claim_cmt_vs_diffusion(res["table"])
    out = report_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(res, out / "metric_vs_compute.png")
    plot_samples(res, res["heldout"], out / "samples.png")
    (out / "report.md").write_text(markdown(params, res, claim))
    res["table"].to_csv(out / "compute_to_target.csv")
    write_json(out / "summary.json", {"metric": res["metric"], "target": res["target"], "noise_floor": res["floor"],
                                      "claim": claim,
                                      "summary": summary_lines(params, res, claim)})
    return out


def summary(params: Params) -> str:
    path = report_dir(params) / "summary.json"
    if not path.exists():
        return f"no report yet at {path}: run `dvc repro`"
    lines = read_json(path)["summary"]
    return "\n".join([f"report: {report_dir(params) / 'report.md'}", *lines])
