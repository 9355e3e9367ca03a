"""The report stage: the evidence of `evidence.py` as figures (seaborn), a claim table and compute
tables in Markdown, the same as one offline HTML file, and CSV/JSON that DVC shows as plots and
metrics. Everything lands in reports/<preset>/.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from . import claim_text, html, inits, mlflow_view, study_report  # noqa: E402
from .claim_text import SOURCE, TARGETS, paper  # noqa: E402
from .config import EXACT_DATASETS, Params  # noqa: E402
from .data import load_split, read_json, write_json  # noqa: E402
from .evidence import Evidence, claims, client_for, collect, posttrain_effect  # noqa: E402
from .layout import out_dir, report_dir  # noqa: E402
from .methods import label  # noqa: E402
from .scoring import key  # noqa: E402

STEPS = {"2step": "2-step", "1step": "1-step"}
NOT_METRICS = ("id", "method", "study", "reason", "facts", "comparisons")  # kept out of claims.json
STAGE_LABEL = {"pretrain": "pre-training", "trajectories": "trajectories", "midtrain": "mid-training"}


def _and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + f" and {words[-1]}" if len(words) > 1 else "".join(words)


def _unit(hours: float) -> tuple[str, float]:
    return ("device-seconds", 3600.0) if hours < 0.5 else ("device-hours", 1.0)


def _fmt(x, scale=1.0, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "not reached"
    return f"{x * scale:{spec}}"


def _spread(values: pd.Series, spec=".4g") -> str:
    """mean ± sd over seeds (the sd only where there is more than one seed)."""
    return f"{values.mean():{spec}}" + (f" ± {values.std():.2g}" if len(values) > 1 else "")


# --- figures ----------------------------------------------------------------------------------

def plot_curves(res: Evidence, path: Path) -> None:
    """Rows: method x step count; columns: post-training compute, total compute (wall time, then
    counted FLOPs), images seen; one line per init (mean over seeds), band = min to max over seeds."""
    unit, scale = _unit(res.curves["total_hours"].max())
    axes_x = [("device_hours", f"post-training {unit}", scale), ("total_hours", f"total {unit} (incl. upstream)", scale),
              ("flops_total", "total counted FLOPs (incl. upstream)", 1), ("images_seen", "post-training images seen", 1)]
    rows = [(m, metric) for m in res.methods for metric in (res.metric, res.metric_1step)]
    fig, axes = plt.subplots(len(rows), len(axes_x), figsize=(19, 3.6 * len(rows) + 0.7), squeeze=False, sharey="row")
    sns.set_style("whitegrid")
    for (method, metric), row in zip(rows, axes):
        data = res.mean[res.mean.method == method]
        for ax, (x, xlabel, xscale) in zip(row, axes_x):
            for init in res.inits:
                d = data[data.init == init].sort_values("step")
                ax.plot(d[x] * xscale, d[metric], marker="o", ms=3, c=inits.color(init), label=f"{init} init")
                if d["seeds"].max() > 1:
                    ax.fill_between(d[x] * xscale, d[f"{metric}_min"], d[f"{metric}_max"], color=inits.color(init),
                                    alpha=0.18, lw=0)
            for target_init, ls in (("diffusion", "--"), ("random", "-.")):
                ax.axhline(res.targets[method, target_init, metric], ls=ls, c=inits.color(target_init), lw=1,
                           label=f"target: {TARGETS[target_init]}")
            if res.floor is not None:
                ax.axhline(res.floor, ls=":", c="k", lw=1, label=f"noise floor (n={res.floor_n})")
            ax.set(xlabel=xlabel, ylabel=f"{metric} ({label(method)})", yscale="log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
    seeds = f"mean of {len(res.seeds)} seeds, band = min to max" if len(res.seeds) > 1 else "one seed"
    fig.suptitle(f"in-loop metric (n={res.inloop_n}) during post-training; one line per init ({seeds})")
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


ACCOUNTING_STYLE = {"total": ("o", "every stage counted"), "given_teacher": ("s", "teacher given")}


def plot_intervals(verdicts: list[dict], confidence: float, measure: str, path: Path) -> bool:
    """Claims 1-3: each compute ratio CMT / baseline with its interval over seeds, per accounting, on a
    log axis around 1 (left of it CMT needs less), in the verdicts' `measure`; the paper's accounting
    filled. False: nothing to draw."""
    rows = [(c, acc, iv) for c in verdicts if c["id"] in (1, 2, 3) and "intervals" in c["facts"]
            for acc, iv in c["facts"]["intervals"].items() if np.isfinite(iv["ratio"]) and iv["ratio"] > 0]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(rows) + 1.4))
    finite = [v for _, _, iv in rows for v in (iv["ratio"], iv["low"], iv["high"]) if np.isfinite(v) and v > 0]
    right = max(finite) * 2
    for y, (claim, acc, iv) in enumerate(rows):
        marker, _ = ACCOUNTING_STYLE[acc]
        paper_basis = claim["facts"]["accounting"] == acc
        high = iv["high"] if np.isfinite(iv["high"]) else right
        ax.plot([iv["low"], high], [y, y], c="0.3", lw=2, solid_capstyle="butt")
        ax.plot([iv["ratio"]], [y], marker=marker, ms=8, c="0.15", mfc="0.15" if paper_basis else "white")
    ax.axvline(1, c="crimson", lw=1)
    ax.set_yticks(range(len(rows)), [f"claim {c['id']}, {label(c['method'])}: {ACCOUNTING_STYLE[a][1]}"
                                     for c, a, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel=f"compute to target ({claim_text.MEASURE_WORDS[measure]}), CMT / baseline: "
                                f"left of 1 CMT needs less\n"
                                f"({confidence:.0%} interval over seeds; filled marker: the paper's accounting)")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def image_grid(x: np.ndarray, side: int = 8) -> np.ndarray:
    """The first side x side images of [N, C, H, W] in [-1, 1] tiled into one [H', W'(, 3)] array in [0, 1]."""
    x = np.clip((x[: side * side] + 1) / 2, 0, 1)
    x = np.concatenate([x, np.ones((side * side - len(x), *x.shape[1:]))]) if len(x) < side * side else x
    n, c, h, w = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1)  # white gutters
    grid = pad.reshape(side, side, c, h + 2, w + 2).transpose(0, 3, 1, 4, 2).reshape(side * (h + 2), side * (w + 2), c)
    return grid[..., 0] if c == 1 else grid


def plot_samples(res: Evidence, heldout: np.ndarray, path: Path) -> None:
    """Rows: method x sampler (1- and 2-step); columns: held-out data, then each init (the first
    seed). Points are scattered (their first two coordinates), images tiled."""
    rows = [(m, s) for m in res.methods for s in ("1step", "2step")]
    images, seed = heldout.ndim == 4, res.seeds[0]
    fig, axes = plt.subplots(len(rows), 1 + len(res.inits), figsize=(3 * (1 + len(res.inits)), 3 * len(rows)),
                             sharex=True, sharey=True, squeeze=False)
    n = res.final_n

    def show(ax, x, color):
        if images:
            ax.imshow(image_grid(x), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
        else:
            ax.scatter(x[:, 0], x[:, 1], s=1, c=color, alpha=0.4)
            ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal")
    for r, (method, steps) in enumerate(rows):
        show(axes[r, 0], heldout[:n], "k")
        axes[r, 0].set_title("held-out data" if images else f"held-out data (n={min(n, len(heldout))})")
        for col, init in enumerate(res.inits, start=1):
            show(axes[r, col], np.load(out_dir("evaluate", init, method, seed) / "samples.npz")[steps],
                 inits.color(init))
            axes[r, col].set_title(f"{label(method)}, {init} init, {STEPS[steps]}, seed {seed}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- Markdown ---------------------------------------------------------------------------------

def _metric_line(params: Params, res: Evidence) -> str:
    f = res.features
    if f["kind"] == "classifier":
        what = (f"`{f['metric']}`: torch-fidelity's Frechet distance in the features of a classifier trained in "
                f"the pipeline on the training split (held-out accuracy {f['heldout_accuracy']:.1%})")
    elif f["kind"] == "inception":
        what = "`fid_inception`: torch-fidelity's FID with Inception-v3 features from a local weights file"
    else:
        what = "`fd_raw`: Frechet distance of Gaussians fitted to the raw coordinates"
    if params.data.dataset in EXACT_DATASETS:
        what += ("; `flowmap_err`: the mean distance of each sample from the exact flow map's sample at the same "
                 "noise (a float64 ODE solve of the mixture's closed-form velocity; zero for the exact map, no "
                 "sampling floor); `mode_coverage` / `mode_precision`: the share of modes reached, of samples "
                 "inside a mode's 99.9% ball")
    return (f"Metric: {what}; `sw` is the sliced 2-Wasserstein distance. The report's metric is `{res.metric}` "
            f"(lower is better): in-loop with {res.inloop_n} samples (key `{res.key}`), final evaluation with "
            f"{res.final_n} samples (key `{key(res.metric, res.final_n)}`), both at fixed sample seeds.")


def _floor_line(res: Evidence) -> list[str]:
    if res.floor is None:
        return []
    return [f"Noise floor: {res.floor_n} training samples (never the reference) scored as if they were generated give "
            f"`{res.metric.rsplit('_', 1)[0]}` = {res.floor:.3g}; differences of that order are sampling noise "
            "(for a classifier metric the classifier has seen these images, so the floor is an upper estimate).", ""]


def _data_line(params: Params, res: Evidence, heldout: np.ndarray, train_count: int) -> str:
    kind = f"{'x'.join(map(str, heldout.shape[1:]))} images" if heldout.ndim == 4 else f"{heldout.shape[1]}-D points"
    if params.data.dataset == "gmm":
        g = params.data.gmm
        kind += f" from {g.components} Gaussians (means ~ N(0, {g.spread}^2 I), std {g.scale}, mixture seed {g.seed})"
    return f"`{params.data.dataset}`, {kind}, {train_count} train / {len(heldout)} held out"


def _model_line(params: Params, parameters: int) -> str:
    if params.net.kind == "mlp":
        shape = f"a {params.net.depth}-block MLP (width {params.net.hidden})"
    else:
        shape = f"a UNet (channels {params.net.channels} x {params.net.channel_mult})"
    return f"{shape} of {parameters / 1e6:.2g} M parameters"


def _final_table(res: Evidence, method: str, unit: str, scale: float) -> list[str]:
    m1, m2 = res.metric_1step, res.metric
    lines = [f"Final quality and compute per init ({len(res.seeds)} seed(s): mean ± sd):", "",
             f"| init | `{key(m2, res.final_n)}` | `{key(m1, res.final_n)}` | `{key(m2, res.inloop_n)}` (in-loop) | "
             f"post-training {unit} | total {unit} |", "|---|---|---|---|---|---|"]
    finals = res.finals[res.finals.method == method]
    for init in res.inits:
        f = finals[finals.init == init]
        lines.append(f"| {init} | {_spread(f[f'eval_{m2}'])} | {_spread(f[f'eval_{m1}'])} | {_spread(f[f'inloop_{m2}'])} "
                     f"| {_spread(f['posttrain_hours'] * scale, '.3g')} | {_spread(f['total_hours'] * scale, '.3g')} |")
    return lines + [""]


def _target_table(res: Evidence, method: str, unit: str, scale: float) -> list[str]:
    lines = [f"Compute to reach a target (where each init's mean curve of `{res.key}` first gets there; "
             "per-seed range of total compute beside it):", "",
             f"| target | init | post-training {unit} | total {unit} | total FLOPs | images | seeds reaching it | "
             f"per-seed total {unit} |", "|---|---|---|---|---|---|---|---|"]
    t = res.to_target
    for target_init in TARGETS:
        rows = t[(t.metric == res.metric) & (t.method == method) & (t.target_init == target_init)]
        for _, row in rows.iterrows():
            spread = ("–" if row["seeds_reached"] == 0 else
                      f"{row['total_hours_min'] * scale:.3g} to {row['total_hours_max'] * scale:.3g}")
            lines.append(f"| {target_init} final ({row['target']:.4g}) | {row['init']} | "
                         f"{_fmt(row['posttrain_hours'], scale)} | {_fmt(row['total_hours'], scale)} | "
                         f"{_fmt(row['total_flops'])} | {_fmt(row['images'], spec=',.0f')} | {row['seeds_reached']}/{row['seeds']} | {spread} |")
    return lines + [""]


def _effect_table(res: Evidence, effect: pd.DataFrame) -> list[str]:
    return ["## Did post-training help?", "",
            f"In-loop `{res.key}` of each init before post-training (images seen = 0: the init itself) and after "
            f"it, mean over {len(res.seeds)} seed(s); the change with its {res.rules.confidence:.0%} bootstrap "
            "interval over seeds (lower is better). A claim can hold while post-training made its own "
            "starting point worse: read both.", "",
            "| method | init | before | after | change (interval) | effect |", "|---|---|---|---|---|---|",
            *(claim_text.effect_line(row) for _, row in effect.iterrows()), ""]


def _imported_teacher_line(res: Evidence, unit: str, scale: float) -> list[str]:
    """What an imported teacher's pre-training cost is not measured here; only declared, if at all."""
    if not res.teacher_imported:
        return []
    declared = ("its user declares " + _fmt(res.declared_teacher_hours, scale) + f" {unit} "
                "(declared, not measured; pretrain.teacher.declared_device_hours), not added to any total"
                if res.declared_teacher_hours is not None else "nobody declared what it cost "
                "(pretrain.teacher.declared_device_hours)")
    return [f"The teacher was imported from a file (pretrain.source: import), not trained here: its pre-training "
            f"is counted as 0 in every total above, so the accounting with every stage counted is here the "
            f"accounting with the teacher given; {declared}.", ""]


def _flops_line(res: Evidence) -> list[str]:
    """The counted FLOPs of each upstream stage and of one post-training run (mean over its cells), and
    each one's FLOPs per device-second: where those differ, the two measures weigh the stages differently."""
    sf, sh = res.stage_flops, res.stage_hours
    if not sf:
        return []
    means = res.finals.groupby("method")[["posttrain_flops", "posttrain_hours"]].mean()
    stages = [("pre-training", sf["pretrain"], sh["pretrain"]), ("trajectories", sf["trajectories"], sh["trajectories"]),
              *((f"mid-training for {label(m)}", f, sh["midtrain"][m]) for m, f in sf["midtrain"].items()),
              *((f"one post-training run of {label(m)}", means.loc[m, "posttrain_flops"],
                 means.loc[m, "posttrain_hours"]) for m in res.methods)]
    rate = lambda flops, hours: f"{flops / (hours * 3600):.2g}" if hours > 0 else "–"  # noqa: E731
    return ["Counted FLOPs (and FLOPs per device-second): "
            + "; ".join(f"{name} {flops:.3g} ({rate(flops, hours)})" for name, flops, hours in stages)
            + ". FLOPs weigh all arithmetic alike; a stage that runs slower per FLOP (forward-mode JVPs, small "
            "batches) costs more wall time than its FLOPs say, so where these rates differ a verdict on one "
            "measure can differ from the other: the claim rows give both.", ""]


def markdown(params: Params, res: Evidence, verdicts: list[dict], context: dict, studies: list[str] = (),
             effect: pd.DataFrame | None = None, intervals: bool = False) -> str:
    """`studies`: the sensitivity section's lines (study_report), after the per-method tables;
    `effect`: evidence.posttrain_effect (the "did post-training help?" table), computed if not given;
    `intervals`: whether ratio_intervals.png was drawn."""
    effect = posttrain_effect(res) if effect is None else effect
    unit, scale = _unit(res.curves["total_hours"].max())
    sh = res.stage_hours
    total_spent = (sh["pretrain"] + sh["trajectories"] + sum(sh["midtrain"].values())
                   + res.finals["posttrain_hours"].sum())
    lines = [
        f"# CMT benchmark report: preset `{params.preset}`", "",
        f"Data: {context['data']}. Model: {context['model']}. Post-training: "
        f"{', '.join(label(m) for m in res.methods)} from the {_and([inits.get(i).label for i in res.inits])} inits, "
        f"{len(res.seeds)} seed(s) each ({', '.join(map(str, res.seeds))}), equal images seen.", "",
        _metric_line(params, res), "",
        f"Compute is measured wall time of training steps x devices ({unit} on {res.device}), never estimated; "
        "other load on a shared machine inflates it. Beside it the same work is counted in floating-point "
        "operations (matrix multiplies, convolutions, attention and JVPs, by torch.utils.flop_counter), "
        "which do not move with load; the verdicts rest on "
        f"{claim_text.MEASURE_WORDS[params.report.measure]} (`report.measure`), the other measure beside them. "
        "The claims count compute two ways: every stage an init needs, "
        "and with the teacher given (its pre-training not counted, as in the paper's consistency-model runs "
        "from public EDM checkpoints); each verdict rests on the accounting of the paper's figure, or on both "
        f"where the paper does not say, and on a {res.rules.confidence:.0%} bootstrap interval over seeds of "
        "the compute ratio (holds below 1, does not hold above, not resolved across).", "",
        *_floor_line(res),
        "## Claims", "",
        "| # | claim | paper | measured here | verdict |", "|---|---|---|---|---|",
        *[f"| {c['id']} | {claim_text.sentence(c)} | {paper(c['id'], c['method'])} | "
          f"{claim_text.measured(c, params.report)} | **{claim_text.verdict(c)}** |" for c in verdicts],
        "",
        f"Paper: {SOURCE}. Headline numbers: CIFAR-10 2-step FID 1.97 with up to 98% less data and GPU time than "
        "consistency models; ImageNet 256 1-step FID 3.34 at about half the cost of MeanFlow from scratch.", "",
        f"Scale gap: this run trains {context['model']} on {context['data']} for {total_spent * scale:.3g} {unit} "
        "in all; the paper trains image networks of tens to hundreds of millions of parameters on CIFAR-10 and "
        "ImageNet for many GPU-days, so a verdict here speaks for this scale only.", "",
        *(["![compute ratios with their intervals](ratio_intervals.png)", ""] if intervals else []),
        *_effect_table(res, effect),
        "## Figures", "", "![metric versus compute](metric_vs_compute.png)", "", "![samples](samples.png)", "",
        "## Compute", "",
        f"Upstream stages: pre-training {_fmt(sh['pretrain'], scale)}, trajectories {_fmt(sh['trajectories'], scale)}, "
        "mid-training " + ", ".join(f"{_fmt(h, scale)} (for {label(m)}: CMT-{params.midtrain.variants[m].upper()})"
                                    for m, h in sh["midtrain"].items())
        + f" {unit}. An init's total adds the stages it needs: "
        + "; ".join(f"{inits.get(i).label} = " + " + ".join([*(STAGE_LABEL[s] for s in inits.get(i).upstream),
                                                               "post-training"]) for i in res.inits) + ".", "",
        *_flops_line(res),
        *_imported_teacher_line(res, unit, scale),
    ]
    for method in res.methods:
        lines += [f"### {label(method)}", "", *_final_table(res, method, unit, scale),
                  *_target_table(res, method, unit, scale)]
    lines += ["MLflow runs of post-training: " + ", ".join(f"{m}/{i}/seed{s} `{r}`"
                                                           for (m, i, s), r in res.post_runs.items()), ""]
    return "\n".join([*lines, *studies])


def summary_lines(params: Params, res: Evidence, verdicts: list[dict]) -> list[str]:
    unit, scale = _unit(res.curves["total_hours"].max())
    final = key(res.metric, res.final_n)
    lines = [f"{'method':<9} {'init':<10} {'post-train ' + unit:>26} {'total ' + unit:>21} {final:>24}"]
    means = res.finals.groupby(["method", "init"]).mean(numeric_only=True)
    for method in res.methods:
        for init in res.inits:
            row = means.loc[(method, init)]
            lines.append(f"{method:<9} {init:<10} {row['posttrain_hours'] * scale:>26.3g} "
                         f"{row['total_hours'] * scale:>21.3g} {row[f'eval_{res.metric}']:>24.4g}")
    return lines + [f"claim {c['id']} ({label(c['method'])}): {claim_text.verdict(c)} "
                    f"({claim_text.measured(c, params.report)})"
                    for c in verdicts]


# --- the stage --------------------------------------------------------------------------------

def _curve_files(res: Evidence, out: Path) -> None:
    """curves/<method>.csv: images seen and the mean in-loop metric of each init (DVC plots)."""
    (out / "curves").mkdir(exist_ok=True)
    for method in res.methods:
        mean = res.mean[res.mean.method == method]
        wide = mean.pivot(index="images_seen", columns="init", values=res.metric)[list(res.inits)]
        wide.reset_index().to_csv(out / "curves" / f"{method}.csv", index=False)


def build(params: Params) -> Path:
    res = collect(params)
    out = report_dir(params.preset)
    out.mkdir(parents=True, exist_ok=True)
    sensitivity_claims, sensitivity_lines = study_report.build(out, params.report)
    verdicts = [c for c in claims(res) if c["id"] != 4 or not sensitivity_claims] + sensitivity_claims
    data_dir = out_dir("data")
    heldout = load_split(data_dir, "heldout").numpy()
    weights = out_dir("posttrain", "cmt", res.methods[0], res.seeds[0]) / "model.pt"
    parameters = sum(v.numel() for v in torch.load(weights, map_location="cpu", weights_only=True)["ema"].values())
    context = {"data": _data_line(params, res, heldout, read_json(data_dir / "manifest.json")["splits"]["train"]["count"]),
               "model": _model_line(params, parameters)}
    plot_curves(res, out / "metric_vs_compute.png")
    plot_samples(res, heldout, out / "samples.png")
    effect = posttrain_effect(res)
    intervals = plot_intervals(verdicts, params.report.confidence, params.report.measure, out / "ratio_intervals.png")
    text = markdown(params, res, verdicts, context, sensitivity_lines, effect, intervals)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(html.render(text, out, f"CMT benchmark report: {params.preset}"))
    res.to_target.to_csv(out / "compute_to_target.csv", index=False)
    res.finals.to_csv(out / "finals.csv", index=False)
    effect.to_csv(out / "posttrain_effect.csv", index=False)
    _curve_files(res, out)
    # DVC metrics: each claim's verdict and its measured ratios (the sentences are in report.md)
    write_json(out / "claims.json", {f"claim{c['id']}_{c.get('study', c['method'])}":
                                     {**{k: v for k, v in c.items() if k not in NOT_METRICS},
                                      "verdict": claim_text.verdict(c)} for c in verdicts})
    client = client_for(params)
    experiment_id = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    mlflow_view.install(client, experiment_id, res.key, params.preset, res.methods)
    # what `cmt-bench summary` prints (summary.py), so it needs no MLflow client nor this module
    write_json(out / "summary.json", {"metric": res.metric, "noise_floor": res.floor,
                                      "summary": summary_lines(params, res, verdicts),
                                      "mlflow_views": {"experiment_id": experiment_id, "methods": list(res.methods)}})
    return out
