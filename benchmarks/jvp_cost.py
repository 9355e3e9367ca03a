"""MeanFlow's JVP four ways: which is cheapest for the same du/dt?

MeanFlow's target needs du/dt = J_u (v, 1, 0), the derivative of the network along the ODE tangent.
Four exact ways to get it, timed on the same network, batch and tangent:

- `func_jvp`: `torch.func.jvp` (functorch transform; what the loss used before `lean`);
- `dual`: `torch.autograd.forward_ad` dual tensors (the same forward-mode formulas, no transform);
- `lean`: dual tensors under the lean rules of `cmt_bench.jvp` (what `compiling.total_derivative`
  runs eagerly since they were measured here);
- `double_vjp`: reverse mode twice (a VJP with a dummy cotangent w, then its gradient in w), which
  needs only double-backward support.

Each rep times every way once (the order rotates per rep) after a warm-up; the result is the median
over reps of way time / `func_jvp` time within the rep, measured in this one run, plus each way's
largest deviation from `func_jvp` (they must agree to float tolerance).

    python benchmarks/jvp_cost.py [--preset toy|digits] [--steps N] [--reps R] [--threads T] [--device cpu|cuda]

Writes benchmarks/results/jvp_cost[_<preset>][_gpu].json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_cost import add_run_args, environment, rotated, setup, sync  # noqa: E402  (the script's folder is on sys.path)
from cmt_bench import jvp, ledger  # noqa: E402


@torch.no_grad()
def func_jvp(net, z, t, r, v):
    return torch.func.jvp(net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))[1]


@torch.no_grad()
def dual(net, z, t, r, v):
    with fwAD.dual_level():
        out = net(fwAD.make_dual(z, v), fwAD.make_dual(t, torch.ones_like(t)), r)
        return fwAD.unpack_dual(out).tangent


def double_vjp(net, z, t, r, v):
    with torch.enable_grad():
        z, t = z.detach().requires_grad_(), t.detach().requires_grad_()
        u = net(z, t, r)
        w = torch.zeros_like(u, requires_grad=True)
        gz, gt = torch.autograd.grad(u, (z, t), w, create_graph=True)  # J^T w, linear in w
        (jv,) = torch.autograd.grad((gz, gt), w, (v, torch.ones_like(t)))  # d/dw <J^T w, (v, 1)> = J (v, 1)
    return jv


def lean(net, z, t, r, v):
    return jvp.jvp(net, (z, t, r), (v, torch.ones_like(t), None))


WAYS = {"func_jvp": func_jvp, "dual": dual, "lean": lean, "double_vjp": double_vjp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, steps=50)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params, net, _, x, _ = setup(args.preset, args.shape, args.device)
    gen = torch.Generator(device=x.device).manual_seed(0)
    n = len(x) // 2  # MeanFlow takes the JVP on the r != t part of the batch (preset: r_neq_t = 0.5)
    z, v = torch.randn(x[:n].shape, generator=gen, device=x.device), torch.randn(x[:n].shape, generator=gen, device=x.device)
    t = torch.rand(n, generator=gen, device=x.device) * 0.9 + 0.1
    r = t * torch.rand(n, generator=gen, device=x.device)
    ref = func_jvp(net, z, t, r, v)
    deviation = {k: float((f(net, z, t, r, v) - ref).abs().max() / ref.abs().max()) for k, f in WAYS.items()}

    def timed(f) -> float:
        sync(x)
        start = time.perf_counter()
        for _ in range(args.steps):
            f(net, z, t, r, v)
        sync(x)
        return time.perf_counter() - start

    for f in WAYS.values():
        timed(f)  # warm-up
    names, seconds = list(WAYS), {k: [] for k in WAYS}
    for rep in range(args.reps):
        for k in rotated(names, rep):
            seconds[k].append(timed(WAYS[k]))
    base = seconds["func_jvp"]
    result = {
        "preset": args.preset,
        "ratio_to_func_jvp": {k: statistics.median(a / b for a, b in zip(s, base)) for k, s in seconds.items()},
        "ms_per_jvp": {k: 1000 * statistics.median(s) / args.steps for k, s in seconds.items()},
        "max_relative_deviation_from_func_jvp": deviation,
        "jvp_batch": n, "shape": list(x.shape[1:]), "params_millions": sum(p.numel() for p in net.parameters()) / 1e6,
        "steps": args.steps, "reps": args.reps, "device": ledger.device_name(x.device),
        **environment(),
    }
    suffix = ("" if args.preset == "toy" else f"_{args.preset}") + ("" if args.device == "cpu" else "_gpu")
    out = args.out or ROOT / "benchmarks" / "results" / f"jvp_cost{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(" | ".join(f"{k}: {result['ms_per_jvp'][k]:.2f} ms, x{result['ratio_to_func_jvp'][k]:.2f}, "
                     f"dev {deviation[k]:.1e}" for k in WAYS) + f" | {out}")


if __name__ == "__main__":
    main()
