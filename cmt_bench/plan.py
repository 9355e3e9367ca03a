"""`cmt-bench plan`: what a run of params.yaml will cost on this machine, before it runs.

Every training stage is timed here for a few steps through the same loop it trains with (`train.train`,
nothing logged), on the preset's real data (the data stage itself runs in memory; `--shape` times
random samples of that shape instead, for data not on this machine), mid-training on random
trajectories of the configured shape (a step's cost does not depend on the values) or, with
trajectories.mode on_the_fly, on the teacher's trajectories drawn per batch, and every network
starts from random weights: the preset's own, or an imported teacher's architecture
(`--stand-in-teacher` names a diffusers folder whose architecture is timed in its place when the
teacher is not on this machine). The trajectories stage is timed on one batch of the teacher's
ODE; an imported teacher is not trained, so it has no pre-training row. Each is timed over 10 steps, or more where those take under 2 s (up to 500). A stage's projection is its measured seconds per step (the first step, which warms up, left out)
times the steps its budget takes, times the cells that run it (a study's trials timed on the threads
each trial gets, `studies.workers` at a time); so it is labelled a projection. The
FLOPs beside it are counted (ledger.py), and exact for these budgets. Not projected: evaluation (in
the loop and final), the features stage, the report, and each stage's start-up (about a second under
`cmt-bench repro`).

With a budget (`--budget-hours`, or $CMT_BENCH_BUDGET_HOURS for `cmt-bench repro`) a projection
above it stops: `plan` exits with status 3, `repro` asks on a terminal and refuses elsewhere.
`--batch B` times (and counts) the training steps at a smaller batch and scales them to each stage's:
a paper-sized step takes minutes on a CPU, where the cost grows about linearly with the batch.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as datasets
from . import distributed, linear, losses, solvers
from .config import Params, load
from .ledger import Ledger, count_flops, device_name
from .paths import PATHS
from .stages.common import build_net
from .stages.midtrain import LOSS as MIDTRAIN_LOSS
from .stages.midtrain import on_the_fly
from .stages.posttrain import posttrain_loss
from .train import Job, train

BUDGET_ENV = "CMT_BENCH_BUDGET_HOURS"
OVER_BUDGET = 3  # the exit status of a plan or run over its budget
STEPS = 10  # training steps timed per stage, at least
MIN_SECONDS = 2.0  # ... and at least this long (up to MAX_STEPS): shorter windows are mostly timer and scheduler noise
MAX_STEPS = 500


@dataclass
class Row:
    stage: str
    cells: int  # how many times the stage runs (matrix cells, study trials)
    steps: int  # per cell
    seconds_per_step: float  # measured
    flops_per_step: float  # counted
    what: str = ""  # what a step is where it is not a training step
    at_once: int = 1  # runs side by side (a study's workers): the wall time divides by it

    @property
    def device_hours(self) -> float:
        return self.cells * self.steps * self.seconds_per_step / 3600

    @property
    def flops(self) -> float:
        return self.cells * self.steps * self.flops_per_step


class _Rows(list):
    """The plan's rows, each announced through `say` with the time its timing took."""
    def __init__(self, say):
        super().__init__()
        self.say, self.since = say, time.perf_counter()

    def append(self, row: Row) -> None:
        super().append(row)
        now = time.perf_counter()
        if row.steps:
            self.say(f"timed {row.stage}: {row.seconds_per_step:.3g} s/step ({now - self.since:.0f} s to time)")
        self.since = now


class _Untracked:
    """Where train() logs a timing run's points: nowhere (a plan records nothing)."""
    run_id = None

    def log_metrics(self, step, values) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass


def _timed(params: Params, net, loss, data: torch.Tensor | None, train_cfg, steps: int, batch: int | None = None,
           **job) -> tuple[float, float]:
    """(seconds, counted FLOPs) per step of `loss` through the training loop, at train_cfg's batch,
    over `steps` steps, or more where those took under MIN_SECONDS; `job`: Job's other fields (a draw).
    With a smaller `batch`, timed and counted at that batch and scaled to train_cfg's."""
    scale = 1.0
    if batch is not None and batch < train_cfg.batch_size:
        scale, train_cfg = train_cfg.batch_size / batch, train_cfg.model_copy(update={"batch_size": batch})
    seconds, flops = _timed_over(params, net, loss, data, train_cfg, steps, job)
    if seconds * steps < MIN_SECONDS and steps < MAX_STEPS:
        more = min(MAX_STEPS, math.ceil(MIN_SECONDS / max(seconds, 1e-6)))
        seconds, flops = _timed_over(params, net, loss, data, train_cfg, more, job)
    return seconds * scale, flops * scale


def _timed_over(params: Params, net, loss, data: torch.Tensor | None, train_cfg, steps: int,
                job: dict) -> tuple[float, float]:
    """A run of 1 step and one of 1 + `steps`, so the first step's warm-up cancels; FLOPs counted once."""
    dev = distributed.device(params.compute.device)
    precision = distributed.precision_used(params.compute.precision, dev)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    seconds, flops = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 1 + steps):
            net.load_state_dict(start)
            cfg = train_cfg.model_copy(update={"budget_images": n * train_cfg.batch_size,
                                               "log_every_images": 10 ** 15, "checkpoint_every_images": 10 ** 15})
            ledger = Ledger(device=device_name(dev))
            train(net.to(dev), Job("plan", data=data, loss=loss, **job), cfg, seed=0, ckpt_path=Path(tmp) / f"{n}.pt",
                  fingerprint="plan", ledger=ledger, open_tracker=lambda _: _Untracked(), precision=precision,
                  compile=params.compute.compile, draws=params.compute.draws, flops_per_step=flops)
            seconds.append(ledger.seconds)
            flops = ledger.flops / n
    return max(seconds[1] - seconds[0], 0.0) / steps, flops


def _steps(train_cfg) -> int:
    return math.ceil(train_cfg.budget_images / train_cfg.batch_size)


def project(params: Params, steps: int = STEPS, shape: tuple[int, ...] | None = None,
            stand_in_teacher: str | None = None, say=lambda line: None,
            batch: int | None = None) -> tuple[list[Row], float]:
    """The rows of the plan and the measured seconds of the data stage (run here, in memory; 0 with
    `shape`, random samples of that shape). `stand_in_teacher`: a diffusers folder whose architecture
    is timed for an imported teacher that is not on this machine. `say` gets a line as each stage is
    timed (a large preset on a CPU takes minutes per stage). `batch`: time training steps at this
    batch and scale them to each stage's (a CPU's cost grows about linearly with the batch)."""
    from .study_spec import load_spec  # studies: their trial counts and budgets
    if stand_in_teacher is not None:
        # a diffusers architecture: its time embedding where diffusers puts it, whatever the real teacher's
        diffusers_embedding = type(params.pretrain.teacher).model_fields["time_embedding"].default
        teacher_cfg = params.pretrain.teacher.model_copy(update={"path": stand_in_teacher, "format": "diffusers",
                                                                 "time_embedding": diffusers_embedding})
        params = params.model_copy(update={"pretrain": params.pretrain.model_copy(update={"teacher": teacher_cfg})})
    linear.use(params.compute.matmul)  # timed on the products' route the stages take
    started = time.perf_counter()
    if shape is None:
        train_x = datasets.as_float(datasets.make_splits(params.data, params.seed)[0])
    else:  # enough random samples for the largest batch
        largest = max(params.pretrain.train.batch_size, params.posttrain.train.batch_size, 2)
        train_x = torch.rand(largest, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data_seconds = time.perf_counter() - started if shape is None else 0.0
    shape, path, rows = tuple(train_x.shape[1:]), PATHS["linear"](), _Rows(say)
    torch.manual_seed(0)
    net = lambda two_times: build_net(params, shape, two_times)  # noqa: E731  # random weights

    pre = params.pretrain
    teacher = net(False)
    if pre.source == "import":
        rows.append(Row("pretrain (imported teacher)", 0, 0, 0.0, 0.0, "not trained here"))
    else:
        sec, flops = _timed(params, teacher, lambda n, x, g, seen: losses.flow_matching_loss(n, path, x, g, pre.t_sampling),
                            train_x, pre.train, steps, batch)
        rows.append(Row("pretrain", 1, _steps(pre.train), sec, flops))

    traj = params.trajectories
    grid = solvers.time_grid(traj.steps, traj.grid, traj.rho)
    dev = distributed.device(params.compute.device)
    teacher = teacher.to(dev).eval().requires_grad_(False)
    if traj.mode == "stored":
        x1 = torch.randn(traj.batch_size, *shape, device=dev)
        solve = lambda x: solvers.integrate(lambda z, t: teacher(z, t), x, grid, traj.solver)[0].cpu()  # noqa: E731
        solve(x1[:1])  # warm-up
        started = time.perf_counter()
        solve(x1)
        sec = time.perf_counter() - started
        flops = count_flops(lambda: solve(x1[:1])) * traj.batch_size
        rows.append(Row("trajectories", 1, math.ceil(traj.count / traj.batch_size), sec, flops,
                        f"the teacher's ODE on {traj.batch_size} trajectories"))

    mid = params.midtrain
    times = grid.to(train_x.dtype)
    if traj.mode == "stored":
        source = dict(data=torch.randn(max(mid.train.batch_size, 2), traj.steps + 1, *shape))
    else:  # each batch's trajectories drawn from the teacher: part of the mid-training step
        source = dict(data=None, draw=on_the_fly(teacher, shape, times, traj.solver))
    for method in params.posttrain.methods:
        variant = mid.variants[method]
        loss = MIDTRAIN_LOSS[variant]
        sec, flops = _timed(params, net(True), lambda n, x, g, seen: loss(n, x, times.to(x.device), g, mid.distance),
                            train_cfg=mid.train, steps=steps, batch=batch, **source)
        rows.append(Row(f"midtrain for {method} (CMT-{variant.upper()})", 1, _steps(mid.train), sec, flops,
                        "with the teacher's trajectories for its batch" if traj.mode == "on_the_fly" else ""))

    post = params.posttrain
    for method in post.methods:
        sec, flops = _timed(params, net(True), posttrain_loss(params, method, path), train_x, post.train, steps, batch)
        rows.append(Row(f"posttrain {method}", len(post.inits) * len(post.seeds), _steps(post.train), sec, flops))
    # a study's trials run `workers` at a time on studies.threads threads each: timed on those threads
    studies, threads = params.studies, torch.get_num_threads()
    torch.set_num_threads(studies.threads)
    try:
        for name in studies.specs:
            spec = load_spec(name, params)
            sec, flops = _timed(params, net(True), posttrain_loss(params, spec.method, path),
                                train_x, post.train, steps, batch)
            rows.append(Row(f"study {name} ({spec.method})", spec.trials * len(spec.inits),
                            math.ceil(spec.objective.budget_images / post.train.batch_size), sec, flops,
                            at_once=min(studies.workers, spec.trials * len(spec.inits))))
    finally:
        torch.set_num_threads(threads)
    return list(rows), data_seconds


def _duration(hours: float) -> str:
    seconds = hours * 3600
    return (f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min" if seconds < 6000
            else f"{hours:.2f} h" if hours < 100 else f"{hours:,.0f} h")


def _wall(row: Row, world: int) -> float:
    """Projected wall hours: a study's workers share the runs; `processes` share every pipeline step."""
    return row.device_hours / (row.at_once if row.at_once > 1 else world)


def table(params: Params, rows: list[Row], data_seconds: float, steps: int, batch: int | None = None) -> list[str]:
    dev = distributed.device(params.compute.device)
    world = params.compute.processes
    lines = [f"Projection for preset `{params.preset}` on {device_name(dev)}: seconds per step measured here over "
             f"at least {steps} steps and {MIN_SECONDS:g} s of each stage"
             + (f" at batch {batch}, scaled linearly to the stage's batch (about right on a CPU, not on a GPU)"
                if batch is not None else "")
             + ", times the steps its budget takes (a projection, not a measurement); FLOPs counted "
             + ("(torch.utils.flop_counter) at that batch and scaled the same way." if batch is not None else
                "(torch.utils.flop_counter), exact for these budgets."), "",
             f"{'stage':<34} {'runs':>5} {'steps/run':>10} {'s/step':>9} {'device-hours':>13} {'wall time':>10} "
             f"{'FLOPs':>9}"]
    for r in rows:
        # with `processes` > 1 the device-hours stay (each process does its share), the wall time divides
        lines.append(f"{r.stage:<34} {r.cells:>5} {r.steps:>10,} {r.seconds_per_step:>9.3g} {r.device_hours:>13.3g} "
                     f"{_duration(_wall(r, world)):>10} {r.flops:>9.3g}"
                     + (f"  (a step: {r.what})" if r.what else "")
                     + (f"  ({r.at_once} at a time, {params.studies.threads} thread(s) each)" if r.at_once > 1 else ""))
    hours = total_hours(rows)
    lines += [f"{'in all':<34} {'':>5} {'':>10} {'':>9} {hours:>13.3g} {_duration(sum(_wall(r, world) for r in rows)):>10} "
              f"{sum(r.flops for r in rows):>9.3g}",
              "", f"The data stage took {data_seconds:.1f} s here. Not projected: evaluation (in-loop and final), "
              "features, report and each stage's start-up."]
    if world > 1:
        lines.append(f"Wall time assumes compute.processes = {world} share every step evenly (measured here on one).")
    return lines


def total_hours(rows: list[Row]) -> float:
    return sum(r.device_hours for r in rows)


def main(params: Params, steps: int | None = None, budget_hours: float | None = None, shape: str | None = None,
         stand_in_teacher: str | None = None, batch: int | None = None) -> int:
    steps = STEPS if steps is None else steps
    if steps < 1:
        print(f"error: --steps: at least 1 (got {steps})", file=sys.stderr)
        return 2
    if batch is not None and batch < 1:
        print(f"error: --batch: at least 1 (got {batch})", file=sys.stderr)
        return 2
    try:
        dims = None if shape is None else tuple(int(d) for d in shape.split(","))
    except ValueError:
        dims = ()
    if dims is not None and (not dims or min(dims) < 1):
        print(f"error: --shape: positive integers C,H,W or D (got {shape!r})", file=sys.stderr)
        return 2
    if stand_in_teacher is not None and not (Path(stand_in_teacher) / "config.json").is_file():
        print(f"error: --stand-in-teacher: no diffusers model folder (config.json) at {stand_in_teacher!r}",
              file=sys.stderr)
        return 2
    _stderr(f"timing the training stages of preset `{params.preset}` here, a line as each is timed")
    with tempfile.TemporaryDirectory() as tmp:
        params, lpips_stand_in = _lpips_stand_in(params, Path(tmp))
        rows, data_seconds = project(params, steps, dims, stand_in_teacher, say=_stderr, batch=batch)
    print("\n".join(table(params, rows, data_seconds, steps, batch)))
    stand_ins = ([f"random samples of shape {shape} for the data"] if dims is not None else []) \
        + ([f"the architecture of {stand_in_teacher} (random weights) for the imported teacher"]
           if stand_in_teacher is not None else []) \
        + ([f"random VGG16 weights for the LPIPS distance of {', '.join(lpips_stand_in)}"] if lpips_stand_in else [])
    if stand_ins:
        print("Timed on stand-ins: " + "; ".join(stand_ins) + ".")
    hours = total_hours(rows)
    if budget_hours is not None and hours > budget_hours:
        print(f"over budget: {hours:.3g} projected device-hours > {budget_hours:g}", file=sys.stderr)
        return OVER_BUDGET
    return 0


def _lpips_stand_in(params: Params, folder: Path) -> tuple[Params, list[str]]:
    """An LPIPS distance whose weights files are not on this machine is timed with random weights
    saved in `folder` (a step costs the same); returns the params and the sections stood in for."""
    from .losses.lpips import save_random
    from .preflight import missing_lpips_files
    stood_in, update = [], {}
    for stage in ("midtrain", "posttrain"):
        section = getattr(params, stage)
        dist = section.distance
        if dist.kind != "lpips" or not missing_lpips_files(dist):
            continue
        vgg, lin = save_random(folder)
        update[stage] = section.model_copy(update={"distance": dist.model_copy(
            update={"vgg_weights": vgg, "lpips_weights": lin})})
        stood_in.append(f"{stage}.distance")
    return params.model_copy(update=update), stood_in


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def confirm_budget(params_path: str = "params.yaml") -> bool:
    """Before `cmt-bench repro`: True without $CMT_BENCH_BUDGET_HOURS; with it, project params.yaml and
    go on if the projection fits, else ask on a terminal (refuse elsewhere)."""
    raw = os.environ.get(BUDGET_ENV)
    if not raw:
        return True
    try:
        budget = float(raw)
    except ValueError:
        print(f"error: ${BUDGET_ENV}: a number of device-hours (got {raw!r})", file=sys.stderr)
        return False
    params = load(params_path)
    rows, data_seconds = project(params, say=_stderr)
    hours = total_hours(rows)
    if hours <= budget:
        print(f"projected {hours:.3g} device-hours, within ${BUDGET_ENV} = {budget:g}", file=sys.stderr)
        return True
    print("\n".join(table(params, rows, data_seconds, STEPS)), file=sys.stderr)
    question = f"projected {hours:.3g} device-hours exceed ${BUDGET_ENV} = {budget:g}"
    if not sys.stdin.isatty():
        print(f"{question}: not run (raise the budget, or run on a terminal to confirm)", file=sys.stderr)
        return False
    return input(f"{question}; run anyway? [y/N] ").strip().lower() in ("y", "yes")
