"""The report: metric versus measured compute per init and post-training method, compute to reach
a target, and one claim row per method.

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
import torch  # noqa: E402

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


def load_curves(client, run_ids: dict[tuple[str, str], str], keys: list[str]) -> pd.DataFrame:
    """One row per logged step of each (method, init) post-training run."""
    frames = []
    for (method, init), run_id in run_ids.items():
        cols = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
        frame = pd.DataFrame(cols).rename_axis("step").reset_index().sort_values("step")
        frames.append(frame.assign(method=method, init=init))
    return pd.concat(frames, ignore_index=True)


def _table(curves: pd.DataFrame, final_eval: dict, metric: str, method: str) -> tuple[float, pd.DataFrame]:
    """Compute to reach the diffusion-init's final metric, per init, for one method."""
    curves = curves[curves.method == method]
    finals = curves.sort_values("step").groupby("init").last()
    target = float(finals.loc["diffusion", metric])
    rows = []
    for init in INITS:
        hit = reach(curves[curves.init == init].sort_values("step"), metric, target,
                    ("device_hours", "total_hours", "images_seen"))
        rows.append({
            "init": init,
            "upstream_hours": float(finals.loc[init, "upstream_hours"]),
            "posttrain_hours": float(finals.loc[init, "device_hours"]),
            "total_hours": float(finals.loc[init, "total_hours"]),
            "images_seen": int(finals.loc[init, "images_seen"]),
            f"final_{metric}": float(finals.loc[init, metric]),
            f"eval_{metric}": final_eval[method, init]["metrics"][metric],
            "posttrain_hours_to_target": hit and hit["device_hours"],
            "total_hours_to_target": hit and hit["total_hours"],
            "images_to_target": hit and hit["images_seen"],
        })
    return target, pd.DataFrame(rows).set_index("init")


def collect(params: Params) -> dict:
    """Everything the report shows, read from MLflow via the run ids in the stage outputs."""
    client = _client(params)
    metric, methods = params.report.metric, params.posttrain.methods

    def hours(stage: str, method: str | None = None) -> float:
        run_id = read_json(out_dir(stage, method=method) / "run.json")["run_id"]
        return client.get_run(run_id).data.metrics["device_hours"]
    # mid-training runs once per method (its CMT variant), so upstream compute is per (init, method)
    stage_hours = {"pretrain": hours("pretrain"), "trajectories": hours("trajectories"),
                   "midtrain": {m: hours("midtrain", m) for m in methods}}
    upstream = {(m, i): sum(stage_hours["midtrain"][m] if s == "midtrain" else stage_hours[s] for s in UPSTREAM[i])
                for m in methods for i in INITS}
    cells = [(m, i) for m in methods for i in INITS]
    post_runs = {c: read_json(out_dir("posttrain", c[1], c[0]) / "run.json")["run_id"] for c in cells}
    curves = load_curves(client, post_runs, ["device_hours", "images_seen", metric])
    curves["upstream_hours"] = [upstream[m, i] for m, i in zip(curves["method"], curves["init"])]
    curves["total_hours"] = curves["upstream_hours"] + curves["device_hours"]
    final_eval = {c: read_json(out_dir("evaluate", c[1], c[0]) / "metrics.json") for c in cells}
    heldout = load_split(out_dir("data"), "heldout").numpy()
    targets, tables = {}, {}
    for method in methods:
        targets[method], tables[method] = _table(curves, final_eval, metric, method)
    return {"metric": metric, "methods": methods, "targets": targets, "tables": tables, "curves": curves,
            "stage_hours": stage_hours, "eval_samples": next(iter(final_eval.values()))["samples"],
            "post_runs": post_runs, "floor": noise_floor(params, heldout), "heldout": heldout,
            "train_count": read_json(out_dir("data") / "manifest.json")["splits"]["train"]["count"],
            "device": client.get_run(post_runs[cells[0]]).data.tags.get("device", "an unknown device"),
            "parameters": sum(v.numel() for v in torch.load(out_dir("posttrain", "cmt", methods[0]) / "model.pt",
                                                            map_location="cpu", weights_only=True)["ema"].values())}


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


LABEL = {"ect": "ECT", "meanflow": "MeanFlow"}
PAPER_ROW = {"ect": "CIFAR-10: 2-step FID 1.97 with up to 98% less data and GPU time than consistency models",
             "meanflow": "ImageNet 256: 1-step FID 3.34 at about half the training cost of MeanFlow from scratch"}


# A target within this factor of the noise floor cannot tell reaching it from sampling noise.
FLOOR_MARGIN = 1.25
# Compute ratios within this of 1 are a tie: repeated toy runs measured ratios 0.70-0.85 for the
# same weights, from wall-time noise alone.
TIME_TIE = 0.10
NOT_RESOLVED = "not resolved at this scale"


def claim_cmt_vs_diffusion(table: pd.DataFrame, method: str, target: float, floor: float | None) -> dict:
    claim = (f"Post-training ({LABEL[method]}) from CMT reaches the diffusion-init's final quality with less "
             "total compute")
    cmt, diff = table.loc["cmt"], table.loc["diffusion"]
    if floor is not None and target <= FLOOR_MARGIN * floor:
        return {"method": method, "claim": claim, "verdict": NOT_RESOLVED,
                "measured": f"the target ({target:.3g}) is within {FLOOR_MARGIN}x the metric's noise floor "
                            f"({floor:.3g}): reaching it cannot be told from sampling noise"}
    if pd.isna(cmt["total_hours_to_target"]):
        return {"method": method, "claim": claim, "verdict": "does not hold at this scale",
                "measured": "the CMT init never reached the target within its post-training budget"}
    total = cmt["total_hours_to_target"] / diff["total_hours_to_target"]
    post = cmt["posttrain_hours_to_target"] / diff["posttrain_hours_to_target"] \
        if diff["posttrain_hours_to_target"] else float("nan")
    verdict = (NOT_RESOLVED if abs(total - 1) < TIME_TIE else
               "holds at this scale" if total < 1 else "does not hold at this scale")
    already = cmt["images_to_target"] == 0
    return {"method": method, "claim": claim, "verdict": verdict, "ratio_total": float(total),
            "ratio_posttrain": float(post), "cmt_met_target_before_posttraining": bool(already),
            "measured": f"CMT total / diffusion total compute to target = {total:.2f} "
                        f"(post-training only: {post:.2f}"
                        + ("; the CMT init met the target before any post-training)" if already else ")")
                        + (f"; within {TIME_TIE:.0%} of 1, the wall-time noise" if verdict == NOT_RESOLVED else "")}


def _unit(hours: float) -> tuple[str, float]:
    return ("device-seconds", 3600.0) if hours < 0.5 else ("device-hours", 1.0)


def plot_curves(res: dict, path: Path) -> None:
    """One row per method, one column per compute axis, one line per init."""
    curves, metric, methods = res["curves"], res["metric"], res["methods"]
    unit, scale = _unit(curves["total_hours"].max())
    axes_x = [("device_hours", f"post-training {unit}"), ("total_hours", f"total {unit} (incl. upstream stages)"),
              ("images_seen", "post-training images seen")]
    fig, axes = plt.subplots(len(methods), 3, figsize=(15, 3.8 * len(methods) + 0.6), squeeze=False, sharey="row")
    for row, method in enumerate(methods):
        for ax, (x, label) in zip(axes[row], axes_x):
            data = curves[curves.method == method]
            data = data.assign(x=data[x] * (scale if x != "images_seen" else 1))
            sns.lineplot(data=data, x="x", y=metric, hue="init", hue_order=list(INITS), palette=PALETTE, marker="o",
                         ax=ax)
            ax.axhline(res["targets"][method], ls="--", c="k", lw=1, label="target (diffusion-init final)")
            if res["floor"] is not None:
                ax.axhline(res["floor"], ls=":", c="0.5", lw=1, label="noise floor (held-out vs held-out)")
            ax.set(xlabel=label, ylabel=f"{metric} ({LABEL[method]})", yscale="log")
            handles, labels = ax.get_legend_handles_labels()
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"{metric} during post-training: one row per method, one line per init")
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(x: np.ndarray, side: int = 8) -> np.ndarray:
    """The first side x side images of [N, C, H, W] in [-1, 1] tiled into one [H', W'(, 3)] array in [0, 1]."""
    x = np.clip((x[: side * side] + 1) / 2, 0, 1)
    x = np.concatenate([x, np.ones((side * side - len(x), *x.shape[1:]))]) if len(x) < side * side else x
    n, c, h, w = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1)  # white gutters
    grid = pad.reshape(side, side, c, h + 2, w + 2).transpose(0, 3, 1, 4, 2).reshape(side * (h + 2), side * (w + 2), c)
    return grid[..., 0] if c == 1 else grid


def plot_samples(res: dict, heldout: np.ndarray, path: Path) -> None:
    """Rows: method x sampler (1- and 2-step); columns: held-out data, then each init. Points are
    scattered, images tiled."""
    rows = [(m, s) for m in res["methods"] for s in ("1step", "2step")]
    images = heldout.ndim == 4
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), sharex=True, sharey=True, squeeze=False)
    n = res["eval_samples"]

    def show(ax, x, color):
        if images:
            ax.imshow(image_grid(x), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
        else:
            ax.scatter(*x.T, s=1, c=color, alpha=0.4)
            ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
    for r, (method, steps) in enumerate(rows):
        show(axes[r, 0], heldout[:n], "k")
        axes[r, 0].set_title("held-out data" if images else f"held-out data (n={min(n, len(heldout))})")
        for col, init in enumerate(INITS, start=1):
            show(axes[r, col], np.load(out_dir("evaluate", init, method) / "samples.npz")[steps], PALETTE[init])
            axes[r, col].set_title(f"{LABEL[method]}, {init} init, {steps.replace('step', '-step')}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(x, scale=1.0, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "not reached"
    return f"{x * scale:{spec}}"


def _floor_line(res: dict) -> list[str]:
    if res["floor"] is None:
        return []
    return [f"Noise floor: two disjoint held-out sets of the in-loop size score `{res['metric']}` = "
            f"{res['floor']:.3g} against each other; differences of that order are sampling noise.", ""]


def _compute_table(res: dict, method: str, unit: str, scale: float) -> list[str]:
    metric, table = res["metric"], res["tables"][method]
    lines = [f"### {LABEL[method]}", "",
             f"Target: the diffusion-init's final in-loop `{metric}` = {res['targets'][method]:.4g}.", "",
             f"| init | post-training {unit} to target | total {unit} to target | images to target | "
             f"post-training {unit} (all) | total {unit} (all) | final `{metric}` (in-loop) | final `{metric}` "
             f"({res['eval_samples']} samples) |",
             "|---|---|---|---|---|---|---|---|"]
    for init, row in table.iterrows():
        lines.append(f"| {init} | {_fmt(row['posttrain_hours_to_target'], scale)} | "
                     f"{_fmt(row['total_hours_to_target'], scale)} | {_fmt(row['images_to_target'], spec=',.0f')} | "
                     f"{_fmt(row['posttrain_hours'], scale)} | {_fmt(row['total_hours'], scale)} | "
                     f"{row[f'final_{metric}']:.4g} | {row[f'eval_{metric}']:.4g} |")
    return lines + [""]


def _data_line(res: dict) -> str:
    heldout = res["heldout"]
    kind = f"{'x'.join(map(str, heldout.shape[1:]))} images" if heldout.ndim == 4 else "2-D points"
    return f"{kind}, {res['train_count']} train / {len(heldout)} held out"


def _model_line(params: Params, res: dict) -> str:
    if params.net.kind == "mlp":
        shape = f"a {params.net.depth}-block MLP (width {params.net.hidden})"
    else:
        shape = f"a UNet (channels {params.net.channels} x {params.net.channel_mult})"
    return f"{shape} of {res['parameters'] / 1e6:.2g} M parameters on {_data_line(res)}"


def markdown(params: Params, res: dict, claims: list[dict]) -> str:
    metric = res["metric"]
    unit, scale = _unit(res["curves"]["total_hours"].max())
    sh = res["stage_hours"]
    lines = [
        f"# CMT benchmark report: preset `{params.preset}`", "",
        f"Dataset: `{params.data.dataset}` ({_data_line(res)}), "
        f"metric `{metric}` (lower is better; in-loop with {params.evaluate.inloop_samples} samples, final "
        f"evaluation with {res['eval_samples']} samples). Compute is measured wall time of training steps x "
        f"devices ({unit}), not estimated; on a shared machine other load inflates it.", "",
        *_floor_line(res),
        "## Claims", "",
        "| claim | paper | measured | verdict |", "|---|---|---|---|",
        *[f"| {c['claim']} | {PAPER_ROW[c['method']]} | {c['measured']} | **{c['verdict']}** |" for c in claims], "",
        f"Paper: {PAPER}", "",
        f"Scale gap: this run trains {_model_line(params, res)} on {res['device']}; the paper trains "
        f"image UNets/DiTs with tens to hundreds of millions of parameters on GPUs for days, so agreement or "
        f"disagreement here says little about the paper's scale.", "",
        "## Compute to reach the target", "",
        f"Upstream stages: pre-training {_fmt(sh['pretrain'], scale)}, trajectories {_fmt(sh['trajectories'], scale)}, "
        "mid-training " + ", ".join(f"{_fmt(h, scale)} ({LABEL[m]}: CMT-{params.midtrain.variants[m].upper()})"
                                    for m, h in sh["midtrain"].items())
        + f" {unit}; an init's total adds the stages it needs.", "",
    ]
    for method in res["methods"]:
        lines += _compute_table(res, method, unit, scale)
    lines += ["## Figures", "", "![metric versus compute](metric_vs_compute.png)", "",
              "![samples](samples.png)", "",
              "MLflow runs of post-training: " + ", ".join(f"{m}/{i} `{r}`" for (m, i), r in res["post_runs"].items()),
              ""]
    return "\n".join(lines)


def summary_lines(res: dict, claims: list[dict]) -> list[str]:
    metric = res["metric"]
    unit, scale = _unit(res["curves"]["total_hours"].max())
    lines = [f"{'method':<9} {'init':<10} {'post-train ' + unit:>26} {'total ' + unit:>21} {'final ' + metric:>16}"]
    for method in res["methods"]:
        for init, row in res["tables"][method].iterrows():
            lines.append(f"{method:<9} {init:<10} {row['posttrain_hours'] * scale:>26.3g} "
                         f"{row['total_hours'] * scale:>21.3g} {row[f'eval_{metric}']:>16.4g}")
    lines += [f"claim ({LABEL[c['method']]}): {c['verdict']} ({c['measured']})" for c in claims]
    return lines


def report_dir(params: Params) -> Path:
    return Path("reports") / params.preset


def build(params: Params) -> Path:
    res = collect(params)
    claims = [claim_cmt_vs_diffusion(res["tables"][m], m, res["targets"][m], res["floor"]) for m in res["methods"]]
    out = report_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(res, out / "metric_vs_compute.png")
    plot_samples(res, res["heldout"], out / "samples.png")
    (out / "report.md").write_text(markdown(params, res, claims))
    pd.concat(res["tables"], names=["method"]).to_csv(out / "compute_to_target.csv")
    write_json(out / "summary.json", {"metric": res["metric"], "targets": res["targets"], "noise_floor": res["floor"],
                                      "claims": claims, "summary": summary_lines(res, claims)})
    return out


def summary(params: Params) -> str:
    path = report_dir(params) / "summary.json"
    if not path.exists():
        return f"no report yet at {path}: run `dvc repro`"
    lines = read_json(path)["summary"]
    return "\n".join([f"report: {report_dir(params) / 'report.md'}", *lines])
