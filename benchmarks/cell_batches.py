"""How many cells should one DVC process run? `cmt-bench repro` hands a lane's cells to DVC a few at a
time (cmt_bench/schedule.py CELLS_PER_PROCESS); one per process pays DVC's start-up and repository
scan per cell.

One toy repo (this repository's HEAD, studies off, `--budget` post-training images per cell) is
reproduced up to the starts stage once; then, per rep and per setting, a copy of it runs the post-
training and evaluation cells with `cmt-bench repro --jobs 2` and CELLS_PER_PROCESS set in the copy's
own code (the settings alternate, the first rotating each rep). Reported per setting: the wall time
of that command, the training steps' device-seconds inside it (the cells' ledgers), and the overhead,
wall minus steps over the lanes; the ratio of walls is the median over reps, measured in this one run.

    python benchmarks/cell_batches.py [--settings 1,3] [--reps 2] [--budget 200000]

Writes benchmarks/results/cell_batches.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmt_bench import config  # noqa: E402

SETTING = re.compile(r"^CELLS_PER_PROCESS = \d+", re.M)


def sh(cmd: list[str], cwd: Path, env: dict) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def prepare(base: Path, budget: int, env: dict) -> None:
    """A clone of HEAD with the toy's parameters (studies off, `budget` images per cell), reproduced up
    to the starts stage."""
    sh(["git", "clone", "-q", str(ROOT), str(base)], ROOT, env)
    params = config.override(config.preset("toy", base), {"studies.specs": [], "posttrain.train.budget_images": budget},
                             "benchmarks/cell_batches.py")
    (base / "params.yaml").write_text(config.to_yaml(params))
    sh(["dvc", "repro", "starts", "study_index"], base, env)


def steps_seconds(repo: Path) -> tuple[int, float]:
    """(post-training cells, their training steps' seconds: each cell's measured device-seconds)."""
    runs = [json.loads(p.read_text()) for p in (repo / "artifacts/posttrain").glob("*/*/seed*/run.json")]
    return len(runs), sum(r["ledger"]["seconds"] for r in runs)


def one(base: Path, setting: int, env: dict) -> dict:
    repo = Path(tempfile.mkdtemp(prefix=f"cells{setting}-", dir=base.parent))
    shutil.copytree(base, repo, symlinks=True, dirs_exist_ok=True)
    code = repo / "cmt_bench/schedule.py"
    code.write_text(SETTING.sub(f"CELLS_PER_PROCESS = {setting}", code.read_text(), count=1))
    start = time.monotonic()
    sh([sys.executable, "-m", "cmt_bench", "repro", "--jobs", "2"], repo, env)
    wall = time.monotonic() - start
    cells, steps = steps_seconds(repo)
    shutil.rmtree(repo)
    return {"cells_per_process": setting, "cells": cells, "wall_s": wall, "steps_s": steps,
            "overhead_s": wall - steps / 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="1,3")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=int, default=200_000, help="post-training images per cell")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cell_batches.json")
    args = ap.parse_args()
    settings = [int(s) for s in args.settings.split(",")]
    env = {**os.environ, "CI": "true", "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    work = Path(tempfile.mkdtemp(prefix="cell_batches-"))
    base = work / "base"
    prepare(base, args.budget, env)
    rows = []
    for rep in range(args.reps):
        order = settings[rep % len(settings):] + settings[:rep % len(settings)]
        for setting in order:
            rows.append({"rep": rep, **one(base, setting, env)})
            print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work)
    first = settings[0]
    ratios = {s: statistics.median(
        [next(r["wall_s"] for r in rows if r["rep"] == rep and r["cells_per_process"] == first)
         / next(r["wall_s"] for r in rows if r["rep"] == rep and r["cells_per_process"] == s)
         for rep in range(args.reps)]) for s in settings}
    result = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(),
              "machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "budget_images": args.budget,
              "reps": args.reps, "rows": rows,
              f"wall_ratio_to_{first}_per_process": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
