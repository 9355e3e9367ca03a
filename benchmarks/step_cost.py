"""Cost of one training step per method, as a ratio to an eager fp32 flow-matching step.

Same network, batch, optimizer and data for every method; reps alternate the cells (the order
rotates each rep) after a warm-up, and each ratio is the median over reps of cell time / baseline
time within the rep, measured in this one run. MeanFlow's and sCT's JVP costs extra forward-mode
passes; ECT costs a second (no-grad) forward; AlphaFlow is timed at each phase of its curriculum.
A cell is (precision, compute.compile mode, memory format, method); the baseline is always timed.
Noise, times and batch picks are drawn on the network's device, as training draws them
(compute.draws device); `--draws host` draws them on the CPU and copies them over each step.
`meanflow_fixed_rows` (this benchmark only) is MeanFlow with one JVP shape every step (#20's
hypothesis about per-shape cuDNN plans). `--compile graphs` (this benchmark only, not a compute.compile mode yet) is `step` under CUDA graphs
(torch.compile mode reduce-overhead): what is left of the launch overhead. A cell that fails to
compile or run is reported with its error instead of stopping the others.

    python benchmarks/step_cost.py [--preset toy|digits] [--steps N] [--reps R] [--threads T]
    python benchmarks/step_cost.py --compile none,step,jvp --methods meanflow
    python benchmarks/step_cost.py --preset fashion --device cuda --precision fp32,bf16 --shape 1,32,32 \
        --compile none,jvp --memory-format contiguous,channels_last --methods meanflow

Writes benchmarks/results/step_cost[_gpu][_<preset>].json: one row per cell with ms per step,
images/s, the ratio, the warm-up time (compilation included) and, on CUDA, the GPU busy fraction
(kernel time from the profiler over the unprofiled wall time) and peak memory. The toy MLP, or the
preset's UNet on random samples of its data shape (`--shape` stands in for data not on this
machine), at the preset's batch size and method settings.
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

from cmt_bench import compiling, config, data, distributed, ledger, losses, methods, nets, train  # noqa: E402
from cmt_bench.distributed import autocast  # noqa: E402
from cmt_bench.paths import LinearPath  # noqa: E402


def step_fns(params: config.Params, net) -> dict:
    """{name: loss(x, generator)} of flow matching and of every registered method (a curriculum per
    phase) on `net`, the network as the loss calls it (compiled or not)."""
    path, post = LinearPath(), params.posttrain
    return {
        "flow_matching": lambda x, g: losses.flow_matching_loss(lambda z, t: net(z, t), path, x, g,
                                                                params.pretrain.t_sampling),
        **{label: (lambda x, g, m=m, n=images: m.loss(net, path, x, g, n, getattr(post, m.name), post.distance))
           for m in methods.REGISTRY.values() for label, images in phases(m, post)},  # every registered method
        FIXED_ROWS: lambda x, g: meanflow_fixed_rows(net, path, x, g, post.meanflow),
        FIXED_PLAIN: lambda x, g: meanflow_fixed_rows(net, path, x, g, post.meanflow, plain_norms=True),
    }


FIXED_ROWS = "meanflow_fixed_rows"  # a benchmark cell, not a method: see meanflow_fixed_rows
FIXED_PLAIN = "meanflow_fixed_plain"  # the same with the JVP's norms as elementary ops


def meanflow_fixed_rows(net, path, x0, generator, cfg, plain_norms: bool = False):
    """MeanFlow whose JVP runs on exactly round(r_neq_t x batch) rows every step (MeanFlow draws the
    count, so the JVP's batch changes from step to step). Tests #20's hypothesis that the new shape
    each step makes cuDNN plan again (365 us of CPU per convolution in the H200 profile, 50 in FM).
    `plain_norms`: the JVP's group norms as mean/var arithmetic (compiling.PlainNorms), whose forward-mode
    rules are elementwise, instead of torch's decomposed native_group_norm (686 us of CPU per call)."""
    import contextlib
    from cmt_bench.compiling import PlainNorms
    from cmt_bench.losses.average_velocity import adaptive_weighted, meanflow_target, sample_times
    from cmt_bench.losses.flow_matching import gaussian_noise
    n = x0.shape[0]
    k = round(cfg.r_neq_t * n)
    eps = gaussian_noise(x0, generator)
    t, r = (s.to(x0.device) for s in sample_times(n, cfg.t_sampling, 1.0, generator))  # every row r < t
    r = torch.cat([r[:k], t[k:]])  # rows are exchangeable: the first k are a random subset
    z, v = path.sample(x0, eps, t), path.velocity_target(x0, eps)
    with PlainNorms() if plain_norms else contextlib.nullcontext():
        jvp_target = meanflow_target(net, z[:k], t[:k], r[:k], v[:k])
    target = torch.cat([jvp_target, v[k:]])
    return adaptive_weighted(net(z, t, r) - target, cfg.adaptive_p, cfg.adaptive_c)


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
    opt = train.make_optimizer(net, params.posttrain.train)  # as training makes it
    x = torch.randn(params.posttrain.train.batch_size, *shape).to(device)
    return params, net, opt, x, step_fns(params, net)


GRAPHS = "graphs"  # step under CUDA graphs: a benchmark cell, not a compute.compile mode


def for_step(net, mode: str):
    """The network as the loss calls it under `mode` (a compute.compile mode, or GRAPHS)."""
    return torch.compile(net, mode="reduce-overhead") if mode == GRAPHS else compiling.for_step(net, mode)


def generator(device: torch.device, draws: str = "device") -> torch.Generator:
    """The step's random draws: on `device` as training draws them, or on the host (copied per step)."""
    return torch.Generator(device=device if draws == "device" else "cpu").manual_seed(0)


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


def kernel_seconds(fn, opt, x, steps: int, gen, precision: str) -> float:
    """GPU kernel time of `steps` steps, from the profiler (its own overhead is not in it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed(fn, opt, x, steps, gen, precision)
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, steps=100)
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (bf16 autocasts on CUDA only)")
    ap.add_argument("--compile", default="none",
                    help=f"comma-separated compute.compile modes: {', '.join(compiling.MODES)}, or {GRAPHS} (CUDA)")
    ap.add_argument("--draws", default="device", choices=["device", "host"], help="where noise and times are drawn")
    ap.add_argument("--memory-format", default="contiguous", help="comma-separated: contiguous, channels_last (UNet)")
    ap.add_argument("--methods", help="comma-separated subset of the step functions (flow_matching is always timed)")
    args = ap.parse_args()
    precisions, modes, formats = args.precision.split(","), args.compile.split(","), args.memory_format.split(",")
    if not set(precisions) <= {"fp32", "bf16"} or (args.device == "cpu" and precisions != ["fp32"]):
        ap.error(f"--precision {args.precision!r}: allowed fp32, bf16 (bf16 with --device cuda)")
    if not set(modes) <= {*compiling.MODES, GRAPHS} or (GRAPHS in modes and args.device != "cuda"):
        ap.error(f"--compile {args.compile!r}: allowed {', '.join(compiling.MODES)} ({GRAPHS} with --device cuda)")
    if not set(formats) <= {"contiguous", "channels_last"}:  # the keys of `layout` below
        ap.error(f"--memory-format {args.memory_format!r}: allowed contiguous, channels_last")
    if args.threads:
        torch.set_num_threads(args.threads)
    params, net, opt, x, fns = setup(args.preset, args.shape, args.device)
    if "channels_last" in formats and x.ndim != 4:
        ap.error("--memory-format channels_last: a memory format of images; this preset's data are vectors")
    names = list(fns) if not args.methods else ["flow_matching", *[n for n in args.methods.split(",") if n != "flow_matching"]]
    if unknown := set(names) - set(fns):
        ap.error(f"--methods: {', '.join(sorted(unknown))} unknown; allowed {', '.join(fns)}")
    # every cell of the grid, the baseline (eager fp32 contiguous flow matching) first
    cells = [(p, c, f, n) for f in formats for c in modes for p in precisions for n in names]
    base = ("fp32", "none", "contiguous", "flow_matching")
    cells = [base] + [cell for cell in cells if cell != base]
    layout = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    steps_of = {}  # (compile mode, memory format) -> step functions of that model
    for f in formats:
        net.to(memory_format=layout[f])
        for c in modes + ["none"]:
            steps_of[(c, f)] = step_fns(params, for_step(net, c))
    xs = {f: x.contiguous(memory_format=layout[f]) for f in formats + ["contiguous"]}

    def step(cell):
        p, c, f, n = cell
        net.to(memory_format=layout[f])
        return steps_of[(c, f)][n], xs[f], p

    gen = generator(x.device, args.draws)
    peak_gib, compile_s, failed = {}, {}, {}

    def warm_up(cell) -> None:
        fn, xf, p = step(cell)
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        # forward-mode AD loads its decompositions once, cuDNN picks kernels, torch.compile compiles
        # (the JVP once per padded batch size it meets, so a compiled cell warms up longer)
        start = time.perf_counter()
        try:
            timed(fn, opt, xf, 10 if cell[1] == "none" else 40, gen, p)
        except Exception as e:  # one cell's failure (a compiler's, say) is a result, not the end of the run
            if cell == base:
                raise
            failed[cell] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
            print(f"{' '.join(cell)}: failed: {failed[cell]}", flush=True)
            return
        compile_s[cell] = time.perf_counter() - start
        print(f"{' '.join(cell)}: warmed up in {compile_s[cell]:.1f} s", flush=True)
        if x.is_cuda:
            peak_gib[cell] = torch.cuda.max_memory_allocated() / 2**30

    def measure(cells: list) -> list[dict]:
        """One row per cell, all timed in the same reps (order rotated each rep)."""
        seconds = {cell: [] for cell in cells}
        for rep in range(args.reps):
            for cell in rotated(cells, rep):
                fn, xf, p = step(cell)
                seconds[cell].append(timed(fn, opt, xf, args.steps, gen, p))
        busy = {}
        if x.is_cuda:  # kernel time per step over the (unprofiled) median wall time per step
            for cell in cells:
                fn, xf, p = step(cell)
                busy[cell] = (kernel_seconds(fn, opt, xf, args.steps, gen, p) / args.steps) / (
                    statistics.median(seconds[cell]) / args.steps)
        return [{"precision": p, "compile": c, "memory_format": f, "method": n,
                 "ms_per_step": 1000 * statistics.median(seconds[cell]) / args.steps,
                 "images_per_second": len(x) * args.steps / statistics.median(seconds[cell]),
                 "ratio_to_eager_fp32_flow_matching": statistics.median(a / b for a, b in zip(seconds[cell], seconds[base])),
                 "warmup_seconds": compile_s[cell],
                 **({"gpu_busy_fraction": busy[cell], "peak_memory_gib": peak_gib[cell]} if x.is_cuda else {})}
                for cell in cells for p, c, f, n in [cell]]

    suffix = "" if args.preset == "toy" else f"_{args.preset}"
    args.out = args.out or ROOT / "benchmarks" / "results" / (
        f"step_cost{suffix}.json" if args.device == "cpu" else f"step_cost_gpu{suffix}.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the eager cells are measured and written first, then every cell again once the compiled ones
    # have compiled: a run stopped while compiling (a time limit) still leaves the eager figures
    eager = [cell for cell in cells if cell[1] == "none"]
    for group in [eager, cells] if len(eager) < len(cells) else [cells]:
        for cell in group:
            if cell not in compile_s and cell not in failed:
                warm_up(cell)
        rows = measure([cell for cell in group if cell not in failed])
        result = {
            "preset": args.preset, **{m: getattr(params.posttrain, m).model_dump() for m in methods.names()},
            "rows": rows, "failed": [{"precision": p, "compile": c, "memory_format": f, "method": n, "error": e}
                                     for (p, c, f, n), e in failed.items()],
            "complete": group is cells, "draws": args.draws,
            "net": params.net.model_dump(), "params_millions": sum(p.numel() for p in net.parameters()) / 1e6,
            "shape": list(x.shape[1:]), "batch_size": len(x), "steps": args.steps, "reps": args.reps,
            "device": ledger.device_name(x.device), "precisions": precisions, "compile_modes": modes,
            "memory_formats": formats, **environment(),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for r in rows:
            print(f"{r['precision']} {r['compile']} {r['memory_format']} {r['method']}: {r['ms_per_step']:.1f} ms, "
                  f"x{r['ratio_to_eager_fp32_flow_matching']:.2f}"
                  + (f", GPU busy {r['gpu_busy_fraction']:.0%}, {r['peak_memory_gib']:.2f} GiB" if x.is_cuda else ""),
                  flush=True)
        print(args.out, flush=True)


if __name__ == "__main__":
    main()
