"""Where a training step's time goes: torch.profiler over a few steps of one method, after a
warm-up, on the preset's network (random samples of its data shape, as benchmarks/step_cost.py).

    python benchmarks/profile_step.py --preset fashion --shape 1,32,32 --device cuda \\
        --precision bf16 --method meanflow [--compile jvp] [--cudnn-benchmark] [--out FILE]

Prints (and writes to --out) the wall time per step, the summed self time of the GPU kernels per
step (so the GPU's busy fraction), and the top operators by self GPU time and by self CPU time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # step_cost puts the repo on the path too

from step_cost import GRAPHS, for_step, generator, setup, step_fns, sync, train_step  # noqa: E402

from cmt_bench import compiling  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--shape")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--method", default="flow_matching",
                    help="flow_matching or a registered method (a curriculum's phase as name@phase, e.g. alphaflow@alpha=0)")
    ap.add_argument("--compile", default="none", choices=[*compiling.MODES, GRAPHS], help="compute.compile mode")
    ap.add_argument("--draws", default="device", choices=["device", "host"], help="where noise and times are drawn")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    params, net, opt, x, fns = setup(args.preset, args.shape, args.device)
    fns = step_fns(params, for_step(net, args.compile))
    if args.method not in fns:
        ap.error(f"--method {args.method!r}: allowed {', '.join(fns)}")
    fn, gen = fns[args.method], generator(x.device, args.draws)
    for _ in range(10 if args.compile == "none" else 40):  # a compiled JVP compiles once per padded size
        train_step(fn, opt, x, gen, args.precision)
    sync(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(fn, opt, x, gen, args.precision)
        sync(x)
        wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    # kernels only: an operator's row repeats the self time of the kernels it launched
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.steps
    lines = [f"{args.preset} {args.method} {args.precision} compile={args.compile} draws={args.draws} on {x.device} (batch {len(x)}, shape {tuple(x.shape[1:])}, "
             f"cudnn.benchmark={args.cudnn_benchmark}): {1000 * wall:.1f} ms per step under the profiler"]
    if x.is_cuda:
        lines.append(f"GPU kernels {gpu_us / 1000:.1f} ms per step: busy {100 * gpu_us / 1e6 / wall:.0f}% of the wall time")
        lines.append(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
