"""Cost of one training step per method, as a ratio to a plain flow-matching step.

Same network, batch, optimizer and data for every method; reps alternate the methods (the order
rotates each rep) after a warm-up, and each ratio is the median over reps of method time / plain
time within the rep, measured in this one run. MeanFlow's and sCT's JVP costs extra forward-mode
passes; ECT costs a second (no-grad) forward; AlphaFlow is timed at each phase of its curriculum.

    python benchmarks/step_cost.py [--preset toy|digits] [--steps N] [--reps R] [--threads T]
    python benchmarks/step_cost.py --preset fashion --device cuda --precision fp32,bf16 --shape 1,32,32

Writes benchmarks/results/step_cost[_<preset>].json (the toy MLP, or the preset's UNet on
random samples of its data shape, with the preset's batch size and MeanFlow settings). `--shape`
stands in for the data when it is not on this machine. With several precisions every
(precision, method) pair is timed in each rep, and ratios are to fp32 flow matching.
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

from cmt_bench import config, data, distributed, ledger, losses, methods, nets  # noqa: E402
from cmt_bench.distributed import autocast  # noqa: E402
from cmt_bench.paths import LinearPath  # noqa: E402


def step_fns(params: config.Params, net) -> dict:
    path, post = LinearPath(), params.posttrain
    return {
        "flow_matching": lambda x, g: losses.flow_matching_loss(lambda z, t: net(z, t), path, x, g,
                                                                params.pretrain.t_sampling),
        **{label: (lambda x, g, m=m, n=images: m.loss(net, path, x, g, n, getattr(post, m.name), post.distance))
           for m in methods.REGISTRY.values() for label, images in phases(m, post)},  # every registered method
    }


def phases(method, post) -> list[tuple[str, int]]:
    """(name, images seen) of each point where `method`'s step costs differently: its name alone when
    one point (0) tells, else name@phase (a curriculum such as AlphaFlow's)."""
    if method.cost_phases is None:
        return [(method.name, 0)]
    return [(f"{method.name}@{k}", n) for k, n in method.cost_phases(getattr(post, method.name)).items()]


def setup(preset: str, shape_arg: str | None, device_name: str):
    """(params, net, opt, x, step functions): the preset's flow-map network on `device_name`, Adam,
    and one batch of random samples of its data shape (`shape_arg` "C,H,W" stands in for the data)."""
    params = config.preset(preset, ROOT)
    # one sample, as the data stage writes it
    shape = tuple(map(int, shape_arg.split(","))) if shape_arg else tuple(data.make_splits(params.data, seed=0)[1].shape[1:])
    device = distributed.device(device_name)
    torch.manual_seed(0)
    net = nets.build(shape, params.net, two_times=True).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(params.posttrain.train.batch_size, *shape).to(device)
    return params, net, opt, x, step_fns(params, net)


def sync(x) -> None:
    """Wait for x's device: a clock must include the queued GPU work."""
    if x.is_cuda:
        torch.cuda.synchronize()


def train_step(fn, opt, x, gen, precision: str) -> None:
    with autocast(precision, x.device):
        loss = fn(x, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, opt, x, steps: int, gen, precision: str) -> float:
    sync(x)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(fn, opt, x, gen, precision)
    sync(x)
    return time.perf_counter() - start


def add_run_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The options every timing benchmark here takes."""
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", help="one sample's shape, e.g. 3,32,32, instead of reading the preset's data")
    ap.add_argument("--out", type=Path)


def rotated(names: list, rep: int) -> list:
    """The timing order of rep `rep`: rotated by one each rep, so drift hits every entry alike."""
    return names[rep % len(names):] + names[:rep % len(names)]


def environment() -> dict:
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
            "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, steps=100)
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (bf16 autocasts on CUDA only)")
    args = ap.parse_args()
    precisions = args.precision.split(",")
    if not set(precisions) <= {"fp32", "bf16"} or (args.device == "cpu" and precisions != ["fp32"]):
        ap.error(f"--precision {args.precision!r}: allowed fp32, bf16 (bf16 with --device cuda)")
    if args.threads:
        torch.set_num_threads(args.threads)
    params, net, opt, x, fns = setup(args.preset, args.shape, args.device)
    gen = torch.Generator().manual_seed(0)
    names = [(p, n) for p in precisions for n in fns]
    peak_gib = {}
    for p, n in names:
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        timed(fns[n], opt, x, 10, gen, p)  # warm-up (forward-mode AD loads its decompositions once; cuDNN picks kernels)
        if x.is_cuda:
            peak_gib.setdefault(p, {})[n] = torch.cuda.max_memory_allocated() / 2**30
    seconds = {pn: [] for pn in names}
    for rep in range(args.reps):
        for pn in rotated(names, rep):
            seconds[pn].append(timed(fns[pn[1]], opt, x, args.steps, gen, pn[0]))
    base = seconds[("fp32", "flow_matching")]

    def table(stat) -> dict:  # {method: value} for one precision, {precision: {method: value}} for several
        out = {p: {n: stat(seconds[(p, n)]) for n in fns} for p in precisions}
        return out[precisions[0]] if len(precisions) == 1 else out

    result = {
        "ratio_to_flow_matching": table(lambda s: statistics.median(a / b for a, b in zip(s, base))),
        "ms_per_step": table(lambda s: 1000 * statistics.median(s) / args.steps),
        "images_per_second": table(lambda s: len(x) * args.steps / statistics.median(s)),
        **({"peak_memory_gib": peak_gib} if peak_gib else {}),
        "net": params.net.model_dump(), "params_millions": sum(p.numel() for p in net.parameters()) / 1e6,
        "shape": list(x.shape[1:]), "batch_size": len(x), "steps": args.steps, "reps": args.reps,
        "device": ledger.device_name(x.device), "precisions": precisions,
        **environment(),
    }
    result = {"preset": args.preset, **{m: getattr(params.posttrain, m).model_dump() for m in methods.names()}, **result}
    suffix = "" if args.preset == "toy" else f"_{args.preset}"
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        f"step_cost{suffix}.json" if args.device == "cpu" else f"step_cost_gpu{suffix}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(" | ".join(f"{p} {n}: {1000 * statistics.median(seconds[(p, n)]) / args.steps:.1f} ms, "
                     f"x{statistics.median(a / b for a, b in zip(seconds[(p, n)], base)):.2f}"
                     for p, n in names) + f" | {args.out}")


if __name__ == "__main__":
    main()
