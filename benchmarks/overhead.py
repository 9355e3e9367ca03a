"""Harness overhead: `cmt_bench.train.train` (ledger + MLflow + atomic checkpoints) vs a bare loop.

Both sides train the same network with the same flow-matching loss, batch size, Adam lr and EMA
for the same number of steps: the toy MLP on checkerboard points (default), or with `--preset
digits` the digits UNet on the real 8x8 digits (images/s of the harness / of the bare loop is
1 / ratio). Reps alternate bare/harness (the order
flips every rep so drift hits both sides), after one untimed warm-up each; the result is the
median over reps of harness time / bare time of the same rep (adjacent in time, so a slow
spell of the machine hits both), measured in this one run. One torch thread by default: on a
2-core machine two threads make each rep's time swing by +-15%, which swamps a 1% overhead.

    python benchmarks/overhead.py [--preset toy|digits] [--steps N] [--reps R]

Writes benchmarks/results/overhead[_<preset>].json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without needing `pip install -e`
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from cmt_bench import config, data, losses, nets  # noqa: E402
from cmt_bench.ledger import Ledger, device_name  # noqa: E402
from cmt_bench.paths import LinearPath  # noqa: E402
from cmt_bench.tracking import Tracker  # noqa: E402
from cmt_bench.train import Job, make_optimizer, quiet, train  # noqa: E402

TARGET = 1.03
STAGE = "pretrain"  # the flow-matching stage; its loss is the one benchmarked
TIMED = ("bare: the whole loop (batch, loss, zero_grad, backward, Adam step, EMA lerp) for N steps. "
         "harness: the whole train(...) call for N steps (which opens the MLflow run: client, experiment "
         "and parent-run lookup, create_run, params, tags; logs metrics; writes atomic checkpoints) "
         "plus tracker.finish(). Net construction and the one-off sqlite DB creation (warm-up rep) "
         "are not timed.")


def setup(preset: str, steps: int):
    params = config.preset(preset, ROOT)
    # the preset's flow-matching settings, with the log/checkpoint cadence of its post-training
    post = params.posttrain.train
    cfg = params.pretrain.train.model_copy(update={
        "budget_images": steps * params.pretrain.train.batch_size,
        "log_every_images": post.log_every_images, "checkpoint_every_images": post.checkpoint_every_images})
    x = data.as_float(data.make_splits(params.data, seed=0)[0])  # the preset's training data
    return params, cfg, x


def fresh_net(params, shape):
    torch.manual_seed(0)  # identical initial weights on both sides
    return nets.build(shape, params.net, two_times=False)


def loss_fn(params):
    path, t_cfg = LinearPath(), params.pretrain.t_sampling
    return lambda net, xb, gen, seen: losses.flow_matching_loss(net, path, xb, gen, t_cfg)


def run_bare(params, cfg, x, steps: int) -> float:
    net, loss = fresh_net(params, tuple(x.shape[1:])), loss_fn(params)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net, cfg)  # as train() does
    ema_p, net_p = list(ema.parameters()), list(net.parameters())
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        value = loss(net, x[torch.randint(len(x), (cfg.batch_size,), generator=gen)], gen, 0)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, net_p, 1 - cfg.ema_decay)
    return time.perf_counter() - start


def run_harness(params, cfg, x, rep: int) -> tuple[float, float]:
    """Wired as stages.common.train_stage does; returns (wall seconds, seconds spent opening the tracker)."""
    net, opened = fresh_net(params, tuple(x.shape[1:])), []
    ledger = Ledger(device=device_name(torch.device("cpu")))
    job = Job(STAGE, data=x, loss=loss_fn(params))

    def open_tracker(run_id):
        t0 = time.perf_counter()
        tracker = Tracker.open(params, STAGE, method="flow_matching", run_id=run_id,
                               stage_params={STAGE: params.pretrain.model_dump(), "net": params.net.model_dump()})
        if run_id is None:
            tracker.set_tags({"device": ledger.device, "world_size": ledger.world_size})
        opened.append(time.perf_counter() - t0)
        return tracker

    ckpt = Path("checkpoints") / f"rep{rep}" / "last.pt"  # fresh per rep, else the next rep would resume
    start = time.perf_counter()
    result, tracker = train(net, job, cfg, seed=params.seed, ckpt_path=ckpt, fingerprint=f"bench{rep}",
                            ledger=ledger, open_tracker=open_tracker)
    tracker.finish()
    wall = time.perf_counter() - start
    assert result.steps == cfg.budget_images // cfg.batch_size and ckpt.exists()
    shutil.rmtree(ckpt.parent)
    return wall, opened[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy", help="toy (MLP, batch 512) or digits (UNet, batch 128)")
    ap.add_argument("--steps", type=int, default=500, help="training steps per rep")
    ap.add_argument("--reps", type=int, default=15, help="timed reps per side, after one warm-up each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = (args.out or ROOT / "benchmarks" / "results" /
           ("overhead.json" if args.preset == "toy" else f"overhead_{args.preset}.json")).resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other work on the machine makes both sides slower and noisier
    if load > 1.0:
        print(f"warning: load average {load:.1f} before starting; timings will be noisy", file=sys.stderr)
    params, cfg, x = setup(args.preset, args.steps)

    bare, harness, opening = [], [], []
    with tempfile.TemporaryDirectory(prefix="cmt_overhead_") as tmp:
        old_cwd = os.getcwd()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # a real store, not the repo's
        os.chdir(tmp)  # checkpoints and mlartifacts land here
        try:
            t0 = time.perf_counter()
            warm_harness = run_harness(params, cfg, x, -1)[0]  # creates the DB: one-off, untimed
            warm_bare = run_bare(params, cfg, x, args.steps)
            print(f"warm-up: harness {warm_harness:.2f}s (incl. DB creation), bare {warm_bare:.2f}s", file=sys.stderr)
            for rep in range(args.reps):
                for side in (("bare", "harness") if rep % 2 == 0 else ("harness", "bare")):
                    if side == "bare":
                        bare.append(run_bare(params, cfg, x, args.steps))
                    else:
                        wall, opened = run_harness(params, cfg, x, rep)
                        harness.append(wall)
                        opening.append(opened)
                print(f"rep {rep}: bare {bare[-1]:.3f}s  harness {harness[-1]:.3f}s", file=sys.stderr)
            total = time.perf_counter() - t0
        finally:
            os.chdir(old_cwd)

    b, h, o = statistics.median(bare), statistics.median(harness), statistics.median(opening)
    ratio = statistics.median(hr / br for br, hr in zip(bare, harness))
    result = {
        "preset": args.preset, "ratio": ratio, "target": TARGET, "within_target": ratio <= TARGET,
        "images_per_s_harness_over_bare": 1 / ratio,
        "ratio_of_medians": h / b,
        "ratio_excluding_tracker_open": statistics.median((hr - op) / br for br, hr, op in zip(bare, harness, opening)),
        "bare_steps_per_s": args.steps / b, "harness_steps_per_s": args.steps / h,
        "median_seconds": {"bare": b, "harness": h, "harness_tracker_open": o},
        "per_rep_seconds": {"bare": bare, "harness": harness, "harness_tracker_open": opening},
        "warmup_seconds": {"bare": warm_bare, "harness_incl_db_creation": warm_harness},
        "steps": args.steps, "reps": args.reps, "batch_size": cfg.batch_size,
        "log_every_images": cfg.log_every_images, "checkpoint_every_images": cfg.checkpoint_every_images,
        "timed": TIMED, "progress_bar_enabled": not quiet(), "benchmark_seconds": total,
        "torch": torch.__version__, "mlflow": mlflow.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_start": load,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"harness/bare = {ratio:.3f} (target <= {TARGET}; {result['ratio_excluding_tracker_open']:.3f} without "
          f"opening the MLflow run) | "
          f"bare {args.steps / b:.0f} steps/s, harness {args.steps / h:.0f} steps/s | "
          f"{args.steps} steps x batch {cfg.batch_size}, median of {args.reps} reps | {out}")


if __name__ == "__main__":
    main()
