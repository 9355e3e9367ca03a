"""Two independent training cells (post-training seeds, say) side by side, or one after the other?

A cell here is `--steps` training steps of one method on the preset's network (random data of its
shape, as benchmarks/step_cost.py). Per rep, in one run: both cells one after the other in one
process at 2 torch threads (what `dvc repro` does today), and both at once in two processes at 1
thread each (what side-by-side cells would do, threads set so they do not fight). Each side's wall
time is from the first cell's start to the last cell's end, timed inside the processes (process
start and imports are not in it: they are the same either way). The speed-up is the median over
reps of sequential wall / side-by-side wall, measured in this one run; #19 asks whether cells side
by side help on 2 cores.

    python benchmarks/cell_parallelism.py [--preset toy|gmm] [--methods ect,meanflow] [--steps N] [--reps R]

Writes benchmarks/results/cell_parallelism[_<preset>].json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_cells(preset: str, method: str, steps: int, threads: int, seeds: list[int], barrier=None) -> tuple[float, float]:
    """(start, end) wall-clock times of `steps` steps per seed, one seed after the other, in this process."""
    from step_cost import generator, setup, step_fns, train_step
    torch.set_num_threads(threads)
    params, net, opt, x, _ = setup(preset, None, "cpu")
    fn = step_fns(params, net)[method]
    gen = generator(x.device)
    train_step(fn, opt, x, gen, "fp32")  # warm-up: forward-mode AD loads its decompositions
    if barrier is not None:
        barrier.wait()
    start = time.time()
    for seed in seeds:
        gen.manual_seed(seed)
        for _ in range(steps):
            train_step(fn, opt, x, gen, "fp32")
    return start, time.time()


def side_by_side(preset: str, method: str, steps: int) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            spans = pool.starmap(run_cells, [(preset, method, steps, 1, [seed], barrier) for seed in (0, 1)])
    return max(end for _, end in spans) - min(start for start, _ in spans)


def sequential(preset: str, method: str, steps: int) -> float:
    with mp.get_context("spawn").Pool(1) as pool:
        start, end = pool.apply(run_cells, (preset, method, steps, 2, [0, 1]))
    return end - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--methods", default="ect,meanflow")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        seq, par = [], []
        for rep in range(args.reps):  # the order flips each rep, so drift hits both sides
            for side in (("seq", "par") if rep % 2 == 0 else ("par", "seq")):
                (seq if side == "seq" else par).append(
                    (sequential if side == "seq" else side_by_side)(args.preset, method, args.steps))
        rows.append({"method": method, "sequential_2_threads_s": statistics.median(seq),
                     "side_by_side_1_thread_each_s": statistics.median(par),
                     "speedup": statistics.median(a / b for a, b in zip(seq, par)), "reps_seq": seq, "reps_par": par})
        r = rows[-1]
        print(f"{args.preset} {method}: 2 cells of {args.steps} steps: one after the other at 2 threads "
              f"{r['sequential_2_threads_s']:.2f} s, side by side at 1 thread each {r['side_by_side_1_thread_each_s']:.2f} s: "
              f"x{r['speedup']:.2f}", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "cell_parallelism.json" if args.preset == "toy" else f"cell_parallelism_{args.preset}.json")
    out.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "reps": args.reps, "rows": rows,
                               "torch": torch.__version__, "machine": platform.platform(), "cpus": os.cpu_count()},
                              indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
