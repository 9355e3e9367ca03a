"""What cmt_bench/linear.py's oneDNN route buys on this machine: a matrix product by oneDNN against MKL
(torch's F.linear) per shape, and a toy training step with the network's products routed to oneDNN
(compute.matmul onednn) against every product by F.linear (torch), each with Adam fused (what training
uses) and foreach (what it used before). The output says which route compute.matmul auto takes here.

Products: the toy MLP's shapes (batch 512) and a few around them, each the median of reps of N calls
on one thread, interleaved. Steps: `benchmarks/step_cost.py`'s step (network, batch, method settings)
per method; the cells alternate within each rep (order rotated per rep) and every ratio is the median
over reps of cell / baseline in the same rep, measured in this one run. This machine's speed drifts
within minutes; only ratios measured together mean anything.

    python benchmarks/linear_cost.py [--steps 20] [--reps 12] [--methods flow_matching,ect,meanflow] [--out F]

Writes benchmarks/results/linear_cost.json (the committed one: Zen 5, AVX-512; linear_cost_zen4.json,
linear_cost_zen2.json and linear_cost_intel.json: the other machines, with --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # step_cost puts the repo on the path too

from machine import cpu_model  # noqa: E402
from step_cost import environment, generator, rotated, setup, step_fns, train_step  # noqa: E402

from cmt_bench import linear, train  # noqa: E402

SHAPES = [(512, 2, 128), (512, 32, 128), (512, 128, 128), (512, 128, 2), (16, 128, 128), (4096, 128, 128)]


def product_times(reps: int, calls: int) -> list[dict]:
    """Median microseconds per call of x [M, K] @ w [N, K]^T + b, by F.linear and by oneDNN."""
    rows = []
    for m, k, n in SHAPES:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        fns = {"torch": lambda: F.linear(x, w, b), "onednn": lambda: linear.ONEDNN(x, w, b, "none", [], "")}
        times = {name: [] for name in fns}
        for rep in range(reps):
            for name in rotated(list(fns), rep):
                for _ in range(5):
                    fns[name]()
                start = time.perf_counter()
                for _ in range(calls):
                    fns[name]()
                times[name].append((time.perf_counter() - start) / calls * 1e6)
        row = {"m": m, "k": k, "n": n, **{f"{name}_us": statistics.median(v) for name, v in times.items()}}
        row["onednn_over_torch"] = statistics.median(o / t for o, t in zip(times["onednn"], times["torch"]))
        row["routed_to"] = "onednn" if m * k * n >= linear.ONEDNN_MACS else "torch"
        rows.append(row)
        print(f"{m} x {k} x {n}: torch {row['torch_us']:.1f} us, oneDNN {row['onednn_us']:.1f} us, "
              f"x{row['onednn_over_torch']:.2f} (the onednn route sends it to {row['routed_to']})")
    return rows


def step_times(methods: list[str], steps: int, reps: int) -> list[dict]:
    """Per method, ms per step of the four cells (products onednn | torch) x (Adam fused | foreach),
    and each cell's ratio to the old step (all F.linear, foreach) within a rep."""
    params, net, _, x, _ = setup("toy", None, "cpu")
    fns, gen = step_fns(params, net), generator(x.device)
    opts = {"fused": train.make_optimizer(net, params.posttrain.train),
            "foreach": torch.optim.Adam(net.parameters(), lr=params.posttrain.train.lr, foreach=True)}
    cells = [(route, adam) for route in ("onednn", "torch") for adam in ("fused", "foreach")]
    rows = []
    for method in methods:
        times = {cell: [] for cell in cells}
        for rep in range(reps):
            for route, adam in rotated(cells, rep):
                with linear.routed(route):
                    for _ in range(3):
                        train_step(fns[method], opts[adam], x, gen, "fp32")
                    start = time.perf_counter()
                    for _ in range(steps):
                        train_step(fns[method], opts[adam], x, gen, "fp32")
                    times[(route, adam)].append((time.perf_counter() - start) / steps * 1e3)
        base = times[("torch", "foreach")]
        for route, adam in cells:
            t = times[(route, adam)]
            rows.append({"method": method, "products": route, "adam": adam, "ms_per_step": statistics.median(t),
                         "ratio_to_torch_foreach": statistics.median(a / b for a, b in zip(t, base))})
            print(f"{method} products {route}, Adam {adam}: {rows[-1]['ms_per_step']:.2f} ms, "
                  f"x{rows[-1]['ratio_to_torch_foreach']:.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--methods", default="flow_matching,ect,meanflow")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "linear_cost.json")
    args = ap.parse_args()
    if linear.ONEDNN is None:
        ap.error("this torch build has no oneDNN (torch.backends.mkldnn): linear.py routes everything to F.linear")
    torch.set_num_threads(1)
    out = {"environment": {**environment(), "cpu": cpu_model()}, "onednn_macs": linear.ONEDNN_MACS,
           "auto_route": linear.resolve("auto"), "steps": args.steps, "reps": args.reps,
           "products": product_times(args.reps, args.calls),
           "steps_per_method": step_times(args.methods.split(","), args.steps, args.reps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
