"""Where the wall time of a first `make toy` goes.

Clones this repository's HEAD into a fresh folder and runs there what a new user runs, `make toy`
with the default parameters (MLflow and Optuna on SQLite files, two study workers), its install
timed apart, timestamping every line DVC prints as it arrives. Afterwards it splits the time:

- install: what `make toy` installs (the Python environment and the plots page);
- each DVC stage: from the previous stage's closing line to its own (DVC's hashing and lock writes
  included; with cells side by side, `cmt-bench repro --jobs`, this splits the wall time, not a
  cell's own time); for a stage with an MLflow run (its run.json), the run's own duration splits
  into training steps (the ledger's measured seconds, `device_hours`) and the rest of the run
  (in-loop evaluation, checkpoints, logging), and what the stage's process took outside its run
  is its fixed cost (imports, data load);
- the studies: the trials' training-step seconds (each trial run's `device_hours`) within the stage;
- what came before the first stage and after the last (DVC start-up, `cmt-bench summary`);
- `idle`: the core-seconds no stage process used between the first stage's start and the last one's
  end (each stage's process counts one core, a study its workers; threads inside a process, such as
  the teacher's evaluation beside its steps, are not seen), and the longest spans with a core idle.

`posttrain_steps_s_per_million_images` (per method) is how fast this machine trained in the run:
compare it between runs before comparing their minutes. `cpu` names the processor that ran it and
`matmul` the products' route the training runs took (their MLflow `matmul` tag, compute.matmul).

`efficiency` is the training-step device-seconds (pipeline and study trials) over the wall seconds
after the install. `floor_minutes` is the least this content can take on this machine: the install
plus those step-seconds spread evenly over the cores (each step runs on one thread), nothing else;
`above_floor_minutes` is what the run took beyond that (scheduling, evaluation, logging, start-up).
Writes benchmarks/results/pipeline.json (rows per stage, totals per category) and
prints a table.

    python benchmarks/pipeline.py [--workdir DIR] [--out FILE]
    python benchmarks/pipeline.py --analyse DIR   # split an earlier run's timings again
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import cpu_model  # benchmarks/ is on the path: this script's folder

ROOT = Path(__file__).resolve().parents[1]
DONE_LINE = re.compile(r"^done\s+(\S+)\s+([\d.]+) (s|min)\b")  # progress.Stage.close


def run_timed(cmd: list[str], cwd: Path, env: dict, log) -> tuple[float, list[tuple[float, str]]]:
    """(wall seconds, [(seconds since start, line)]) of `cmd`, its output echoed to `log`."""
    start = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
            log.write(f"{lines[-1][0]:9.1f} {line}")
        if proc.wait():
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); its log is {log.name}")
    return time.monotonic() - start, lines


def stage_walls(lines: list[tuple[float, str]], end: float) -> tuple[dict[str, float], float, float]:
    """{stage: wall seconds} from the stages' closing lines (cmt_bench/progress.py): a stage's wall
    runs from the previous stage's closing line to its own, so DVC's hashing and lock writes between
    them count; the first stage's is its own time, what came before it is DVC's start-up."""
    ends = [(t, m.group(1), float(m.group(2)) * (60 if m.group(3) == "min" else 1))
            for t, line in lines if (m := DONE_LINE.match(line))]
    if not ends:
        raise SystemExit("no stage's closing line: did dvc repro run anything?")
    walls, previous = {}, ends[0][0] - ends[0][2]
    for t, name, _ in ends:
        walls[name], previous = t - previous, t
    return walls, ends[0][0] - ends[0][2], end - ends[-1][0]


def dvc_name(run: dict) -> str:
    """The DVC stage (or matrix cell) a stage's run.json belongs to, named as the stage names itself."""
    from cmt_bench.progress import dvc_name as stage_name
    cell = (run.get("init"), run.get("method"), run.get("seed")) if run.get("init") is not None else (run.get("method"),)
    return stage_name(run["stage"], *cell)


def split(work: Path, walls: dict[str, float]) -> tuple[list[dict], float, list[str]]:
    """Per-stage rows (wall, MLflow run duration, training-step seconds), the study trials'
    training-step seconds and the products' routes the runs took, read from the clone's artifacts
    and MLflow store."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = {dvc_name(r): r for r in (json.loads(p.read_text()) for p in (work / "artifacts").rglob("run.json"))}
    rows, routes = [], set()
    for name, wall in walls.items():
        row = {"stage": name, "wall_s": wall}
        timing = work / "logs" / "stages" / f"{name}.json"  # the stage process's own time, imports included
        if timing.exists():
            row["process_s"] = json.loads(timing.read_text())["seconds"]
        if name in runs:
            run = client.get_run(runs[name]["run_id"])
            row["run_s"] = (run.info.end_time - run.info.start_time) / 1000
            routes.add(run.data.tags.get("matmul"))
            if "ledger" in runs[name]:  # a training or ODE stage (evaluation has none)
                row["steps_s"] = runs[name]["ledger"]["seconds"]
                row["images"] = runs[name]["ledger"]["images_seen"]
                row["method"] = runs[name].get("method")
        rows.append(row)
    experiment = client.get_experiment_by_name("cmt_bench")
    trials = client.search_runs([experiment.experiment_id], "tags.stage = 'study_trial'", max_results=50000)
    trial_steps = sum(r.data.metrics.get("device_hours", 0.0) * 3600 for r in trials)
    routes.update(r.data.tags.get("matmul") for r in trials)
    return rows, trial_steps, sorted(r for r in routes if r)


def _cores_held(work: Path, stage: str) -> int:
    """A study's workers (its study.json), one core for any other stage."""
    base, _, spec = stage.partition("@")
    study = work / "artifacts" / "studies" / spec / "study.json"
    return json.loads(study.read_text())["workers"] if base == "studies" and study.exists() else 1


def idle(work: Path, cores: int, top: int = 8) -> dict:
    """Idle core-seconds between the first stage's start and the last one's end, from the stages'
    own timings (logs/stages: start = finished - seconds), and the `top` longest spans with a core idle."""
    spans = []
    for path in (work / "logs" / "stages").glob("*.json"):
        timing = json.loads(path.read_text())
        spans.append((timing["finished"] - timing["seconds"], timing["finished"], _cores_held(work, timing["stage"]),
                      timing["stage"]))
    edges = sorted({t for s in spans for t in s[:2]})
    total, gaps = 0.0, []
    for a, b in zip(edges, edges[1:]):
        running = [s for s in spans if s[0] < b and s[1] > a]
        free = max(0, cores - sum(s[2] for s in running))
        total += free * (b - a)
        if free:
            names = sorted(s[3] for s in running)
            if gaps and gaps[-1]["end"] == a and gaps[-1]["running"] == names and gaps[-1]["idle_cores"] == free:
                gaps[-1]["end"] = b
            else:
                gaps.append({"start": a, "end": b, "idle_cores": free, "running": names})
    t0 = edges[0] if edges else 0.0
    longest = sorted(gaps, key=lambda g: g["idle_cores"] * (g["end"] - g["start"]), reverse=True)[:top]
    return {"core_seconds": total, "window_s": (edges[-1] - t0) if edges else 0.0,
            "longest": [{"from_s": g["start"] - t0, "seconds": g["end"] - g["start"], "idle_cores": g["idle_cores"],
                         "running": g["running"]} for g in longest]}


def category(stage: str) -> str:
    base = stage.split("@")[0]
    training = base in ("pretrain", "midtrain", "posttrain")
    return {"evaluate": "final evaluation", "studies": "studies", "study_index": "report", "report": "report"}.get(
        base, "training stages" if training else "data, features, trajectories, starts")


def per_million_images(rows: list[dict]) -> dict[str, float]:
    """{method: the post-training cells' step seconds per million images}."""
    seconds, images = defaultdict(float), defaultdict(float)
    for row in rows:
        if row["stage"].startswith("posttrain@") and "images" in row:
            seconds[row["method"]] += row["steps_s"]
            images[row["method"]] += row["images"]
    return {m: 1e6 * seconds[m] / images[m] for m in sorted(seconds)}


def summarise(install_s: float, toy_s: float, rows: list[dict], before_s: float, after_s: float,
              trial_steps: float, cores: int) -> dict:
    totals = defaultdict(float)
    for row in rows:
        totals[category(row["stage"])] += row["wall_s"]
    trained = [r for r in rows if "steps_s" in r and category(r["stage"]) == "training stages"]
    steps = sum(r["steps_s"] for r in trained)
    fixed = sum(r.get("process_s", r["wall_s"]) - r["run_s"] for r in trained)
    spread = (steps + trial_steps) / cores  # every training step, one thread each, over all cores
    return {
        "total_minutes": (install_s + toy_s) / 60,
        "install_minutes": install_s / 60,
        "after_install_minutes": toy_s / 60,
        "efficiency": (steps + trial_steps) / toy_s,
        # the least this content can take on this machine: the install, then every training step (one
        # thread each) spread evenly over the cores with nothing else; what the run took above it is
        # what scheduling, evaluation, logging and start-up cost
        "floor_minutes": (install_s + spread) / 60,
        "above_floor_minutes": (toy_s - spread) / 60,
        "seconds": {
            "install": install_s,
            **dict(totals),
            "before first stage (make, DVC start)": before_s,
            "after last stage (summary)": after_s,
        },
        "training_stages": {
            "count": len(trained),
            "steps_s": steps,
            "in_run_other_s": sum(r["run_s"] - r["steps_s"] for r in trained),
            # in the stage's process but outside its MLflow run (imports, data load, the run's opening)
            "fixed_s": fixed,
            "fixed_s_per_stage": fixed / max(1, len(trained)),
        },
        # the stage processes' seconds over the wall seconds: above 1 where cells ran side by side
        "stage_seconds_over_wall": sum(r.get("process_s", 0.0) for r in rows) / toy_s,
        "trajectories_ode_s": sum(r.get("steps_s", 0) for r in rows if r["stage"] == "trajectories"),
        "evaluate_s_per_cell": totals["final evaluation"] / max(1, sum(category(r["stage"]) == "final evaluation"
                                                                       for r in rows)),
        "study_trials_steps_s": trial_steps,
        # the machine's speed in this run, to compare runs on different days: training-step seconds per
        # million images of the post-training cells (two side by side), per method (ect, meanflow)
        "posttrain_steps_s_per_million_images": per_million_images(rows),
        "stages": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to clone (default: a new temporary folder, kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline.json")
    ap.add_argument("--analyse", type=Path, metavar="DIR", help="split the timings of an earlier run in DIR again")
    args = ap.parse_args()
    if args.analyse:
        work = args.analyse
        timings = json.loads((work / "first_run.json").read_text())
    else:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="cmt_bench_first_run_"))
        if work.exists() and any(work.iterdir()):
            ap.error(f"--workdir {work}: not empty; a first run needs a fresh clone")
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        # a new user's shell: no tracking server or study storage configured, no CI quietness
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CMT_BENCH_STUDY_STORAGE",
                                                                 "CMT_BENCH_STUDY_WORKERS", "VIRTUAL_ENV", "CI")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(work / "first_run.log", "w") as log:
            # what `make toy` installs (`make setup` adds what only the tests need)
            install_s, _ = run_timed(["make", ".venv/installed", "plots-template"], work, env, log)
            toy_s, lines = run_timed(["make", "toy"], work, env, log)
        timings = {"install_s": install_s, "toy_s": toy_s, "lines": lines, "cpu": cpu_model()}
        (work / "first_run.json").write_text(json.dumps(timings))
    install_s, toy_s, lines = timings["install_s"], timings["toy_s"], timings["lines"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    walls, before_s, after_s = stage_walls(lines, toy_s)
    rows, trial_steps, routes = split(work, walls)
    # a run from before the file kept its processor: this one's (analyse it on the machine that ran it)
    cpu = timings.get("cpu") or cpu_model()
    cores = os.cpu_count()
    result = {"commit": commit, "workdir": str(work), "cpus": cores, "machine": platform.platform(),
              "cpu": cpu, "matmul": routes,
              **summarise(install_s, toy_s, rows, before_s, after_s, trial_steps, cores),
              "idle": idle(work, cores)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"first make toy: {result['total_minutes']:.1f} min ({result['install_minutes']:.1f} install), "
          f"efficiency {result['efficiency']:.2f}; its training steps alone need {result['floor_minutes']:.1f} min "
          f"with the install ({cores} cores), the rest took {result['above_floor_minutes']:.1f} min")
    for name, s in result["seconds"].items():
        print(f"  {name:45s} {s / 60:6.1f} min")
    t = result["training_stages"]
    print(f"  training stages: {t['count']}, steps {t['steps_s']:.0f} s, rest of their runs {t['in_run_other_s']:.0f} s, "
          f"fixed {t['fixed_s']:.0f} s ({t['fixed_s_per_stage']:.1f} s each); study trials' steps {trial_steps:.0f} s; "
          f"stage seconds / wall {result['stage_seconds_over_wall']:.2f}")
    speed = ", ".join(f"{m} {s:.1f} s" for m, s in result["posttrain_steps_s_per_million_images"].items())
    print(f"  post-training steps per million images: {speed}")
    gaps = result["idle"]
    print(f"  idle: {gaps['core_seconds']:.0f} core-seconds of {cores} x {gaps['window_s']:.0f} s; longest:")
    for g in gaps["longest"]:
        print(f"    at {g['from_s']:6.1f} s for {g['seconds']:5.1f} s, {g['idle_cores']} core(s) idle beside "
              f"{', '.join(g['running']) or 'nothing'}")
    print(args.out)


if __name__ == "__main__":
    sys.exit(main())
