"""Cost of one training step per method, as a ratio to a plain flow-matching step.

Same network, batch, optimizer and data for every method; reps alternate the methods (the order
rotates each rep) after a warm-up, and each ratio is the median over reps of method time / plain
time within the rep, measured in this one run. MeanFlow's JVP costs extra forward-mode passes;
ECT costs a second (no-grad) forward.

    python benchmarks/step_cost.py [--preset toy|digits] [--steps N] [--reps R] [--threads T]

Writes benchmarks/results/step_cost[_<preset>].json (the toy MLP, or the preset's UNet on
random samples of its data shape, with the preset's batch size and MeanFlow settings).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmt_bench import config, data, losses, nets  # noqa: E402
from cmt_bench.paths import LinearPath  # noqa: E402


def step_fns(params: config.Params, net) -> dict:
    path, post = LinearPath(), params.posttrain
    return {
        "flow_matching": lambda x, g: losses.flow_matching_loss(lambda z, t: net(z, t), path, x, g,
                                                                params.pretrain.t_sampling),
        "ect": lambda x, g: losses.ect_loss(net, path, x, g, 0, post.ect, post.distance),
        "meanflow": lambda x, g: losses.meanflow_loss(net, path, x, g, post.meanflow),
    }


def timed(fn, opt, x, steps: int, gen) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = fn(x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = config.preset(args.preset, ROOT)
    shape = tuple(data.make_splits(params.data, seed=0)[1].shape[1:])  # one sample, as the data stage writes it
    torch.manual_seed(0)
    net = nets.build(shape, params.net, two_times=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(params.posttrain.train.batch_size, *shape)
    fns, gen = step_fns(params, net), torch.Generator().manual_seed(0)
    names = list(fns)
    for name in names:
        timed(fns[name], opt, x, 10, gen)  # warm-up (forward-mode AD loads its decompositions once)
    seconds = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            seconds[name].append(timed(fns[name], opt, x, args.steps, gen))
    base = seconds["flow_matching"]
    result = {
        "ratio_to_flow_matching": {n: statistics.median(s / b for s, b in zip(seconds[n], base)) for n in names},
        "ms_per_step": {n: 1000 * statistics.median(seconds[n]) / args.steps for n in names},
        "net": params.net.model_dump(), "batch_size": len(x), "steps": args.steps, "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
        "cpus": os.cpu_count(),
    }
    result = {"preset": args.preset, "meanflow": params.posttrain.meanflow.model_dump(), **result}
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        "step_cost.json" if args.preset == "toy" else f"step_cost_{args.preset}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(" | ".join(f"{n}: {result['ms_per_step'][n]:.1f} ms, x{result['ratio_to_flow_matching'][n]:.2f}"
                     for n in names) + f" | {args.out}")


if __name__ == "__main__":
    main()
