"""`python -m cmt_bench.stages STAGE`: one pipeline stage, what DVC runs (`cmt-bench STAGE` is the
same). Parameters are loaded, validated and checked against the machine before any work. Apart from
`cli` on purpose: a stage's code dependencies are this entry point and the stage's module, not every
other command of the tool."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from .. import config, preflight, progress

STAGES = ("data", "features", "pretrain", "trajectories", "midtrain", "starts", "posttrain", "evaluate")
TRAINING = ("pretrain", "midtrain", "posttrain")
THREADED = ("pretrain", "trajectories", "midtrain", "posttrain", "evaluate")  # those that read compute.threads, .matmul


def add_arguments(sub) -> None:
    """The stage subcommands (also `cmt-bench`'s)."""
    for stage in STAGES:
        s = sub.add_parser(stage, help=f"run the {stage} stage")
        if stage in ("posttrain", "evaluate"):
            s.add_argument("--init", required=True, choices=config.INITS, help="an init of cmt_bench/inits/")
        if stage in ("midtrain", "posttrain", "evaluate"):
            s.add_argument("--method", required=True, choices=config.METHODS, help="a method of cmt_bench/methods/")
        if stage in ("posttrain", "evaluate"):
            s.add_argument("--seed", type=int, default=None,
                           help="post-training seed (default: the first of posttrain.seeds)")


def _relaunch_under_torchrun(processes: int, argv: list[str]) -> int:
    """Run this same command as `processes` DDP workers on this machine (torch's own launcher)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "cmt_bench.stages", *argv]
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m cmt_bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        params = config.load(args.params)
        preflight.check(params, args.params)
    except config.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # training, and a streamed evaluation (evaluate.fid_samples), share their work across processes
    shared = args.command in TRAINING or (args.command == "evaluate" and params.evaluate.fid_samples)
    if shared and params.compute.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_under_torchrun(params.compute.processes, argv)
    if args.command in THREADED:
        import torch

        from ..linear import use
        use(params.compute.matmul)
        if params.compute.threads:
            torch.set_num_threads(params.compute.threads)
    from .. import distributed
    run = importlib.import_module(f"{__package__}.{args.command}").run
    seed = (params.posttrain.seeds[0] if args.seed is None else args.seed) if args.command in ("posttrain", "evaluate") \
        else None
    cell = (args.init, args.method, seed) if seed is not None else (getattr(args, "method", None),)
    quiet = int(os.environ.get("RANK", "0")) != 0  # one line per stage, from rank 0 of a DDP run
    try:
        with progress.stage(progress.dvc_name(args.command, *cell), started, quiet=quiet):
            if seed is not None:
                run(params, args.init, args.method, seed)
            elif args.command == "midtrain":
                run(params, args.method)
            else:
                run(params)
    finally:
        distributed.close()
    return 0
