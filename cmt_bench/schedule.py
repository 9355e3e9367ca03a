"""`cmt-bench repro` with matrix cells side by side: the pipeline's independent cells (mid-training
per method, post-training and final evaluation per init x method x seed) run `jobs` at a time, up to
CELLS_PER_PROCESS of them in turn per `dvc repro -s CELL...` (a post-training cell takes its evaluation
along into the same one), so DVC's start-up and repository scan are paid once for them
(benchmarks/cell_batches.py); the other stages run one `dvc repro` at a time with nothing beside them,
since they feed everything after them or use the cores themselves (a study's workers).

Every stage still runs through DVC, so its outputs, run cache and dvc.lock entry are what one `dvc
repro` writes: DVC releases its repository lock while a stage's command runs, and `--wait-for-lock`
queues the short spans before and after in which it holds it. Side by side pays where a cell leaves
cores idle: a small network gains little from a second thread (two toy cells on one thread each
finished 1.6x and 2.2x sooner than one after the other on two: benchmarks/cell_parallelism.py). The
thread count is compute.threads, a parameter (it changes the order of float sums), so the weights do
not depend on `jobs`; by default `jobs` is the cores over it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .codedeps import CODE_STAGE
from .config import Params
from .progress import NO_BARS

SIDE_BY_SIDE = ("midtrain", "posttrain", "evaluate")  # the stages whose cells depend on the others only
CELLS_PER_PROCESS = 3  # few enough that the lanes still end together (a toy cell takes ~30 s)
# what `dvc repro` prints per stage; each stage prints its own closing line (progress.py)
DVC_STAGE_LINES = re.compile(r"(Running stage '[^']+':|> .*|Updating lock file '[^']+'|)")
# the advice every `dvc repro` process ends with (git add, autostage, push): printed once, at the end
DVC_ADVICE_LINES = re.compile(r"(To track the changes with git, run:|\s+git add .+|To enable auto staging, run:|"
                              r"\s+dvc config core\.autostage true|Use `dvc push` to send your updates to remote storage\.)")


class Advice:
    """DVC's closing advice from every process of a run, kept to print once: its lines in order of first
    appearance, the files of its `git add` lines merged."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.files: list[str] = []

    def take(self, line: str) -> bool:
        """Keep `line` if it is advice (and say so)."""
        if not DVC_ADVICE_LINES.fullmatch(line):
            return False
        if line.split()[:2] == ["git", "add"]:
            self.files += [f for f in line.split()[2:] if f not in self.files]
            line = "\tgit add"
        if line not in self.lines:
            self.lines.append(line)
        return True

    def text(self) -> str:
        return "\n".join(f"{line} {' '.join(self.files)}" if line == "\tgit add" else line for line in self.lines)

    def print(self) -> None:
        if self.lines:
            print(self.text(), flush=True)


def is_cell(stage: str) -> bool:
    """Whether a stage (DVC's name, `stage@item` for a matrix item) may run beside others."""
    return stage.split("@")[0] in SIDE_BY_SIDE


def default_jobs(params: Params) -> int:
    """Cores over compute.threads on a CPU run; 1 where the thread count is left to torch, under DDP
    or on a GPU (one device, which a cell keeps busy)."""
    from .distributed import device  # how a stage resolves compute.device (auto: CUDA when visible)
    compute = params.compute
    if not compute.threads or compute.processes > 1 or compute.device == "cuda" or \
            device(compute.device).type == "cuda":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // compute.threads)


def pipeline() -> tuple[dict[str, list[str]], set[str]]:
    """{stage: the stages it depends on} of dvc.yaml, dependencies first, and the stages `dvc status`
    finds changed (or never run)."""
    import networkx as nx
    from dvc.repo import Repo
    with Repo() as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        stages = {s.addressing: [d.addressing for d in graph.successors(s)]
                  for s in reversed(list(nx.topological_sort(graph)))}
        if not Path("dvc.lock").exists():  # a first run: every stage is new (`dvc status` takes ~2 s to say so)
            return stages, set(stages)
        return stages, set(repo.status())


def downstream(stages: dict[str, list[str]], changed: set[str]) -> set[str]:
    """The changed stages and every stage that depends on one, directly or not."""
    stale: set[str] = set()
    for name, deps in stages.items():
        if name in changed or stale.intersection(deps):
            stale.add(name)
    return stale


def _dvc(args: list[str], env: dict, lock: threading.Lock,
         advice: Advice) -> tuple[subprocess.Popen, threading.Thread]:
    """A DVC process whose output a thread copies to ours, without its per-stage lines and with its
    closing advice kept in `advice`."""
    proc = subprocess.Popen(["dvc", *args], stdout=subprocess.PIPE, text=True, bufsize=1, env=env)

    def forward() -> None:
        for line in proc.stdout:
            text = line.rstrip("\n")
            with lock:
                if not DVC_STAGE_LINES.fullmatch(text) and not advice.take(text):
                    sys.stdout.write(line)
                    sys.stdout.flush()
    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    return proc, thread


def repro(dvc_args: list[str], env: dict, advice: Advice | None = None) -> int:
    """One `dvc repro DVC_ARGS`, as DVC runs it (one stage at a time); its closing advice printed at
    the end, or kept in `advice` for the caller to print."""
    kept = Advice() if advice is None else advice
    proc, thread = _dvc(["repro", *dvc_args], env, threading.Lock(), kept)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # DVC got the same SIGINT: let it stop its stage
        code = proc.wait()
    thread.join()
    if advice is None:
        kept.print()
    return code


def _follower(name: str, stages: dict[str, list[str]], pending: list[str], done: set[str]) -> list[str]:
    """The one side-by-side stage waiting on `name` alone (a cell's evaluation after its post-training),
    to run in the same DVC process: DVC's start-up and repository scan, about 2 s, paid once for both."""
    waiting = [n for n in pending if name in stages[n] and is_cell(n)]
    if len(waiting) == 1 and set(stages[waiting[0]]) - done == {name}:
        return waiting
    return []


def batches(ready: list[str], stages: dict[str, list[str]], pending: list[str], done: set[str], jobs: int,
            free: int) -> list[list[str]]:
    """The DVC processes to start on `free` idle lanes of `jobs`: each up to CELLS_PER_PROCESS of the
    ready cells, a share of them (so the last ones spread over the lanes), each with its follower."""
    cells = [n for n in ready if is_cell(n)]
    if not cells or free < 1:
        return []
    size = min(CELLS_PER_PROCESS, -(-len(cells) // jobs))
    out = []
    for first in range(0, min(len(cells), free * size), size):
        out.append([m for name in cells[first:first + size] for m in (name, *_follower(name, stages, pending, done))])
    return out


def run(jobs: int, env: dict) -> int:
    """Reproduce the whole pipeline with up to `jobs` cells at once; the first failing DVC process's
    exit code (the cells already running finish and are recorded), else 0. DVC's closing advice, which
    each of its processes prints, comes once at the end."""
    advice = Advice()
    try:
        return _run(jobs, env, advice)
    finally:
        advice.print()


def _run(jobs: int, env: dict, advice: Advice) -> int:
    stages, changed = pipeline()
    if CODE_STAGE in changed and changed != set(stages):  # an edit: what it stales follows from the digests
        if code := repro(["-s", CODE_STAGE], env, advice):
            return code
        stages, changed = pipeline()
    stale = downstream(stages, changed)  # a stage with nothing changed upstream is not even asked
    pending, done, running, failed = [n for n in stages if n in stale], set(stages) - stale, [], 0
    lock = threading.Lock()

    def start(names: list[str], cell: bool) -> None:
        proc, forward = _dvc(["--wait-for-lock", "repro", "-s", *names],
                             {**env, NO_BARS: "1"} if cell else env, lock, advice)
        running.append((proc, names, cell, forward))
        for name in names:
            pending.remove(name)

    try:
        while pending or running:
            ready = [n for n in pending if all(d in done for d in stages[n])]
            if not failed and all(cell for _, _, cell, _ in running):
                for names in batches(ready, stages, pending, done, jobs, jobs - len(running)):
                    start(names, cell=True)
                if not running and ready:  # the stages that need the machine alone, as one dvc repro
                    batch = []
                    for name in pending:
                        if not is_cell(name) and all(d in done or d in batch for d in stages[name]):
                            batch.append(name)
                    start(batch, cell=False)
            if not running:
                break  # a failure stopped the launches (or nothing could start)
            time.sleep(0.1)
            for entry in [e for e in running if e[0].poll() is not None]:
                proc, names, _, forward = entry
                running.remove(entry)
                forward.join()
                if proc.returncode == 0:
                    done.update(names)
                else:
                    failed = failed or proc.returncode
    except KeyboardInterrupt:  # the DVC processes got the same SIGINT: let them stop their stages
        for proc, *_ in running:
            proc.wait()
        return 130
    if failed:
        return failed
    if pending:
        print(f"error: stages not run: {', '.join(pending)}", file=sys.stderr)
        return 1
    return 0
