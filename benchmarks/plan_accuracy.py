"""How close `cmt-bench plan` comes to a finished run: its projected training-step seconds and
counted FLOPs per stage against what the run measured and logged.

Give it the folder of a finished `dvc repro` (e.g. the clone `benchmarks/pipeline.py` made); it runs
the plan's projection there (the run's own params.yaml, nothing else running, please) and reads the run's
ledgers: artifacts/*/run.json for the pipeline stages, the MLflow store for the study trials (their
steps ran at each trial's own batch size, which the plan projects at the preset's). Writes a JSON
file with both sides and their ratios per stage, and prints a table.

    python benchmarks/plan_accuracy.py --workdir DIR [--out FILE] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's plan, not the run folder's copy of the package

from cmt_bench import config, plan  # noqa: E402


def planned(work: Path, steps: int) -> tuple[dict[str, dict], float]:
    """Per plan row: runs, projected training-step seconds and counted FLOPs (plan.project in the run's
    folder: its params.yaml and study specs), and the seconds the plan took."""
    started, here = time.perf_counter(), os.getcwd()
    os.chdir(work)
    try:
        rows, _ = plan.project(config.load("params.yaml"), steps)
    finally:
        os.chdir(here)
    return ({r.stage: {"runs": r.cells, "device_s": r.device_hours * 3600, "flops": r.flops} for r in rows},
            time.perf_counter() - started)


def measured(work: Path) -> dict[str, dict]:
    """Per plan row name: the ledgers' summed step seconds and FLOPs."""
    from mlflow.tracking import MlflowClient
    sums: dict[str, dict] = defaultdict(lambda: {"runs": 0, "device_s": 0.0, "flops": 0.0})

    def add(name, seconds, flops):
        sums[name]["runs"] += 1
        sums[name]["device_s"] += seconds
        sums[name]["flops"] += flops
    for path in (work / "artifacts").rglob("run.json"):
        run = json.loads(path.read_text())
        if "ledger" not in run:
            continue
        ledger, stage = run["ledger"], run["stage"]
        seconds = ledger["device_hours"] * 3600
        if stage == "midtrain":
            name = f"midtrain for {run['method']}"
        elif stage == "posttrain":
            name = f"posttrain {run['method']}"
        else:
            name = stage
        add(name, seconds, ledger.get("flops", 0.0))
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cmt_bench")
    for r in client.search_runs([experiment.experiment_id], "tags.stage = 'study_trial'", max_results=50000):
        add(f"study {r.data.tags['study']}", r.data.metrics.get("device_hours", 0.0) * 3600,
            r.data.metrics.get("flops", 0.0))
    return dict(sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan_accuracy.json")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    plan, plan_seconds = planned(args.workdir, args.steps)
    found = measured(args.workdir)
    rows = []
    for name, p in plan.items():
        # plan rows carry a suffix (" (CMT-CM)", " (ect)"); the run's names are their prefix
        m = next((v for k, v in found.items() if name == k or name.startswith(k + " ")), None)
        if m is None:
            continue
        rows.append({"stage": name, "runs_planned": p["runs"], "runs_measured": m["runs"],
                     "device_s_planned": p["device_s"], "device_s_measured": m["device_s"],
                     "time_ratio": p["device_s"] / m["device_s"] if m["device_s"] else None,
                     "flops_planned": p["flops"], "flops_measured": m["flops"],
                     "flops_ratio": p["flops"] / m["flops"] if m["flops"] else None})
    total = {k: sum(r[k] for r in rows) for k in ("device_s_planned", "device_s_measured")}
    result = {"workdir": str(args.workdir), "steps_timed": args.steps, "plan_seconds": plan_seconds, "rows": rows,
              **total, "time_ratio": total["device_s_planned"] / total["device_s_measured"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'stage':<34} {'runs':>9} {'planned s':>10} {'measured s':>10} {'ratio':>6} {'FLOPs ratio':>11}")
    for r in rows:
        print(f"{r['stage']:<34} {r['runs_planned']:>4}/{r['runs_measured']:<4} {r['device_s_planned']:>10.1f} "
              f"{r['device_s_measured']:>10.1f} {r['time_ratio'] or float('nan'):>6.2f} "
              f"{r['flops_ratio'] or float('nan'):>11.3f}")
    print(f"{'in all':<34} {'':>9} {total['device_s_planned']:>10.1f} {total['device_s_measured']:>10.1f} "
          f"{result['time_ratio']:>6.2f}   (the plan itself took {plan_seconds:.0f} s)")


if __name__ == "__main__":
    main()
