"""`cmt-bench COMMAND`: the tool's entry point: the pipeline stages (the same as `python -m
cmt_bench.stages STAGE`, which DVC runs), studies, ablations, the report, presets and checks.

Parameters are loaded and validated before anything else happens, so a bad params.yaml is
refused with the offending key before any work or logging starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import config, preflight, progress
from .stages import run as stage_run


def _study_specs(params: config.Params, args) -> list:
    """Every study spec this command runs, validated against params before any trial starts."""
    from .study_spec import load_spec
    env_workers = os.environ.get("CMT_BENCH_STUDY_WORKERS", "")
    if env_workers and not (env_workers.isdigit() and int(env_workers) >= 1):
        raise config.ParamsError(f"CMT_BENCH_STUDY_WORKERS: must be a whole number >= 1 (got {env_workers!r})")
    if args.command == "study":
        if args.workers is not None and args.workers < 1:
            raise config.ParamsError(f"--workers: must be at least 1 (got {args.workers})")
        specs = [load_spec(args.spec, params)]
    elif args.command in ("studies", "check"):
        specs = [load_spec(name, params) for name in params.studies.specs]
    else:
        return []
    return specs


def split_jobs(argv: list[str]) -> tuple[int | None, list[str]]:
    """`cmt-bench repro`'s arguments as (--jobs or None, the rest for dvc repro); -j N, -jN, --jobs N and
    --jobs=N as argparse takes them. ValueError for a count below 1, or above 1 beside dvc repro's arguments."""
    jobs, dvc_args = None, []
    it = iter(argv)
    for arg in it:
        if arg in ("-j", "--jobs"):
            value = next(it, "")
        elif arg.startswith(("--jobs=", "-j")):
            value = arg.removeprefix("--jobs=") if arg.startswith("--jobs=") else arg[2:]
        else:
            dvc_args.append(arg)
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--jobs: a whole number >= 1 (got {value!r})")
        jobs = int(value)
    if jobs is not None and jobs > 1 and dvc_args:
        raise ValueError(f"--jobs {jobs} runs the whole pipeline with its cells side by side; with dvc repro's "
                         f"own arguments ({' '.join(dvc_args)}) use --jobs 1")
    return jobs, dvc_args


def _repro(argv: list[str]) -> int:
    """dvc repro with its per-stage lines left out (its other output, warnings and errors pass), its
    stages run by a warm interpreter (warm.py) and, for the whole pipeline, its matrix cells `--jobs`
    at a time (schedule.py); with $CMT_BENCH_BUDGET_HOURS set, only after the projected cost
    (plan.py) fits it or a person confirms it."""
    from . import plan, schedule, warm
    try:
        jobs, dvc_args = split_jobs(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    whole = not dvc_args  # the whole pipeline: params checked before DVC starts, the summary at the end
    if whole:
        try:
            params = config.load("params.yaml")
            preflight.check(params, "params.yaml")
        except config.ParamsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not plan.confirm_budget():
        return 3
    with warm.server() as env:  # it imports while torch (for the default jobs) and DVC's graph load here
        env = {**env, progress.SUMMARY_AT_END: "1"} if whole else env
        if jobs is None:
            jobs = schedule.default_jobs(params) if whole else 1
        code = schedule.run(jobs, env) if jobs > 1 else schedule.repro(dvc_args, env)
    if code == 0 and whole:  # what `cmt-bench summary` prints, without its start-up (3.5 s on 2 cores)
        from . import summary
        print("\n".join(summary.lines(params)))
    return code


def _study_plan(params: config.Params, args) -> tuple[int, str]:
    """How many workers, on which storage: the command line, then the environment, then params.yaml."""
    from .study import storage_url
    workers = getattr(args, "workers", None) or int(os.environ.get("CMT_BENCH_STUDY_WORKERS") or params.studies.workers)
    return workers, storage_url(params, getattr(args, "storage", None))


def _run_studies(params: config.Params, specs: list, args, started: float | None) -> int:
    from . import study
    if args.command == "study" and args.action == "worker":
        study.run_worker(params, specs[0], study.storage_url(params, args.storage), args.index)
        return 0
    if args.command == "studies" and args.index_only:
        with progress.stage("study_index", started):
            study.write_index([s.name for s in specs])
        return 0
    workers, url = _study_plan(params, args)
    for spec in specs:
        with progress.stage(f"studies@{spec.name}", started):
            studies = study.run_study(params, spec, workers, url, params_file=args.params)
            out = study.write_results(params, spec, studies, url, workers)
            progress.note(f"{sum(study.finished(s) for s in studies.values())} trials on {workers} workers, in {out}")
        started = None  # the next study's time starts now
    if args.command == "studies":
        study.write_index([s.name for s in specs])
    return 0


def _run_ablation(params: config.Params, spec, args) -> int:
    from . import ablation
    try:
        if args.action == "queue":
            print("queued: " + (", ".join(ablation.queue(spec, args.force)) or "nothing (every level exists)")
                  + "; run them with `dvc queue start -j N`")
            return 0
        if args.action == "run":
            ablation.run(spec, args.jobs, args.force)
        print(f"[ablation {spec.name}] report in {ablation.report(spec, params)}")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _deps(write: bool) -> int:
    """Check (or rewrite) dvc.yaml's code dependencies: each stage on its file of the code stage."""
    from . import codedeps
    dvc_yaml = Path("dvc.yaml")
    if write:
        changed = codedeps.write(dvc_yaml)
        print(f"dvc.yaml: code dependencies rewritten for {', '.join(changed)}" if changed
              else "dvc.yaml: code dependencies already match")
        return 0
    wrong = codedeps.mismatches(dvc_yaml)
    for stage, (lacks, extra) in wrong.items():
        print(f"{stage}: " + "; ".join(part for part in (lacks and f"lacks {', '.join(lacks)}",
                                                         extra and f"should not list {', '.join(extra)}")
                                       if part), file=sys.stderr)
    if wrong:
        print("error: dvc.yaml's code dependencies are wrong: run `cmt-bench deps --write`", file=sys.stderr)
        return 1
    print("dvc.yaml: every stage depends on the code it runs (its file of the code stage)")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmt-bench", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    stage_run.add_arguments(sub)
    sub.add_parser("report", help="run the report stage")
    sts = sub.add_parser("studies", help="run every study in studies.specs, then write artifacts/studies/index.json")
    sts.add_argument("--index-only", action="store_true",
                     help="only write the index (DVC runs each study as its own stage, studies@NAME)")
    st = sub.add_parser("study", help="run one Optuna sensitivity study, or join it as a worker")
    st.add_argument("action", choices=("run", "worker"),
                    help="run: the whole study with --workers processes here, then its results; "
                         "worker: one more process (on any machine) that joins it through --storage")
    st.add_argument("spec", help="a spec name (experiments/studies/NAME.yaml) or path")
    st.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: $CMT_BENCH_STUDY_WORKERS, else studies.workers)")
    st.add_argument("--storage", default=None, help="Optuna storage URL (default: studies.storage, "
                    "$CMT_BENCH_STUDY_STORAGE, else sqlite:///optuna.db)")
    st.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)  # a worker's number (sampler seed)
    ab = sub.add_parser("ablation", help="one factor at several levels as DVC experiments, and their report")
    ab.add_argument("action", choices=("run", "queue", "report"),
                    help="queue: one `dvc exp run --queue` per level; run: queue, `dvc queue start -j JOBS`, wait, "
                         "report; report: reports/ablations/NAME/ from the finished experiments")
    ab.add_argument("spec", help="a spec name (experiments/ablations/NAME.yaml) or path")
    ab.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (default 1)")
    ab.add_argument("-f", "--force", action="store_true",
                    help="rerun levels that have an experiment already, every stage afresh (no run-cache)")
    rep = sub.add_parser("repro", help="`dvc repro` showing one line per stage (and bars on a terminal) instead of "
                                       "DVC's own lines; other arguments go to dvc repro")
    rep.add_argument("-j", "--jobs", type=int, default=None,
                     help="matrix cells at once (default: the cores over compute.threads when it is set, else 1); "
                          "above 1 the whole pipeline, without other arguments")
    rep.add_argument("dvc_args", nargs="*", help="arguments of dvc repro (e.g. -f -s STAGE)")
    sub.add_parser("check", help="validate the parameter file and exit")
    pl = sub.add_parser("plan", help="time a few steps of every stage on this machine and print each stage's "
                                     "projected device-hours and wall time for params.yaml (a projection)")
    pl.add_argument("--steps", type=int, default=None, help="training steps timed per stage (default 10)")
    pl.add_argument("--batch", type=int, default=None, help="time training steps at this smaller batch and scale "
                    "them to each stage's batch (for presets whose steps take minutes on a CPU)")
    pl.add_argument("--budget-hours", type=float, default=None,
                    help="exit with status 3 when the projected device-hours exceed this")
    pl.add_argument("--shape", default=None, help="C,H,W (or D): time random samples of this shape instead of the "
                                                  "data (for data not on this machine)")
    pl.add_argument("--stand-in-teacher", default=None, metavar="FOLDER",
                    help="a diffusers model folder (config.json suffices) whose architecture is timed in place of "
                         "an imported teacher that is not on this machine")
    dep = sub.add_parser("deps", help="check that each dvc.yaml stage depends on its file of the code stage "
                                      "(the sha256 of each module it runs)")
    dep.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code dependencies to match")
    sub.add_parser("summary", help="print the report's short summary")
    pre = sub.add_parser("preset", help="write params.yaml from experiments/NAME.yaml")
    pre.add_argument("name")
    return p


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repro"] and not {"-h", "--help"} & set(argv):  # the rest is dvc repro's, options too
        return _repro(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "deps":
        return _deps(args.write)
    if args.command in stage_run.STAGES:
        return stage_run.main(argv, started)
    try:
        if args.command == "preset":
            params = config.preset(args.name)
            Path(args.params).write_text(config.to_yaml(params))
            print(f"wrote {args.params} from experiments/{args.name}.yaml")
            return 0
        params = config.load(args.params)
        if args.command == "plan":  # a plan may time stand-ins for data and teacher not on this machine
            preflight.check_device(params, args.params)
        elif args.command not in ("report", "summary"):
            preflight.check(params, args.params)
        specs = _study_specs(params, args)
        if args.command == "ablation":
            from . import ablation
            specs = [ablation.load_spec(args.spec, params)]
            if args.jobs < 1:
                raise config.ParamsError(f"--jobs: must be at least 1 (got {args.jobs})")
    except config.ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.params}: valid (preset {params.preset})")
        return 0
    if args.command == "plan":
        from . import plan
        return plan.main(params, args.steps, args.budget_hours, args.shape, args.stand_in_teacher, args.batch)
    if args.command == "report":
        from . import report
        try:
            with progress.stage("report", started):
                report.build(params)
        except (LookupError, FileNotFoundError) as exc:  # a missing stage output or run: say which
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.command in ("report", "summary"):
        from . import summary
        if args.command == "summary" or not os.environ.get(progress.SUMMARY_AT_END):  # else the run ends with it
            print("\n".join(summary.lines(params, links=args.command == "summary")))
        return 0
    if args.command in ("study", "studies"):
        return _run_studies(params, specs, args, started)
    if args.command == "ablation":
        return _run_ablation(params, specs[0], args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
