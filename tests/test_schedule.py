"""`cmt-bench repro --jobs 2` (cmt_bench/schedule.py): a real smoke pipeline with its matrix cells two
at a time, up to three in turn per `dvc repro -s`; DVC's record must be what one `dvc repro` leaves, and
a cell's weights what it gets alone. Its products' route is forced to oneDNN (compute.matmul), whatever
`auto` would take on this machine, and every training run must say so."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_repo, mlflow_runs, sh

from cmt_bench import config, progress, schedule


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo, env = make_repo(tmp_path_factory.mktemp("schedule"), "smoke",
                          {"posttrain": {"seeds": [0, 1]}, "compute": {"threads": 1, "matmul": "onednn"}})
    out = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", "--jobs", "2"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return repo, env, out.stdout + out.stderr


def _cells(repo):
    return {p.stem: json.loads(p.read_text()) for p in (repo / "logs/stages").glob("*.json")}


def test_every_stage_ran_once_and_dvc_records_them_all(repo):
    repo, env, log = repo
    assert "Data and pipelines are up to date" in sh("dvc status", repo, env)
    stages = schedule_names(repo, env)
    timed = _cells(repo)
    assert set(stages) == set(timed) and len(stages) == len(set(stages)), set(stages) ^ set(timed)
    assert "Running stage" not in log  # DVC's per-stage lines are left out, as in one dvc repro
    assert "didn't change, skipping" not in log  # each DVC process looked at its own stages only
    # the end of `make toy`: what `cmt-bench summary` prints, from this process, and only there (the report
    # stage leaves it to the end); DVC's advice once, not once per DVC process; no MLflow store INFO lines
    assert "report: reports/smoke/report.md" in log and "where the time went" in log
    assert log.count("report: reports/smoke/report.md") == 1 and log.count("claim 1 (ECT)") == 1, log
    assert log.count("To track the changes with git, run:") == 1 and log.count("git add") == 1, log
    assert log.index("git add") < log.index("report: reports/smoke/report.md")
    assert "Creating initial MLflow database tables" not in log


def test_every_training_run_took_the_products_route_compute_matmul_forces(repo):
    repo, _, _ = repo
    _, runs = mlflow_runs(repo)
    trained = [r for r in runs if r.data.tags.get("stage") in ("pretrain", "midtrain", "posttrain")]
    assert len(trained) >= 5 and {r.data.tags.get("matmul") for r in trained} == {"onednn"}


def schedule_names(repo, env):
    code = "import json; from cmt_bench import schedule; print(json.dumps(list(schedule.pipeline()[0])))"
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                                     text=True, check=True).stdout)


def test_a_second_run_with_nothing_changed_starts_no_stage(repo):
    repo, env, _ = repo
    before = _cells(repo)
    out = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", "--jobs", "2"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _cells(repo) == before and "didn't change" not in out.stdout + out.stderr  # no DVC process asked


def test_cells_ran_side_by_side_and_nothing_beside_the_other_stages(repo):
    repo, _, _ = repo
    spans = {name: (r["finished"] - r["seconds"], r["finished"]) for name, r in _cells(repo).items()}

    def overlapping(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    cells = [n for n in spans if schedule.is_cell(n)]
    assert any(overlapping(a, b) for a in cells for b in cells if a < b and a.startswith("posttrain")
               and b.startswith("posttrain"))
    alone = [n for n in spans if n.split("@")[0] in ("data", "features", "pretrain", "trajectories")]
    assert not any(overlapping(a, b) for a in alone for b in spans if a != b)
    at_most_two = max(sum(spans[n][0] <= spans[m][0] < spans[n][1] for n in cells) for m in cells)
    assert at_most_two <= 2
    # the summary's time "while any ran" counts the overlap once: less than the stages' seconds summed
    # (whether the summary says so depends on how long the smoke cells overlapped: see the next test)
    records = list(_cells(repo).values())
    assert max(r["seconds"] for r in records) < progress._busy(records) < sum(r["seconds"] for r in records)


def test_the_summary_counts_the_time_side_by_side_once(tmp_path, monkeypatch):
    """Two cells overlapping by 3 s and a stage after them: 12 s of stages, 9 s while any ran. Stages one
    after the other: no such clause (the smoke pipeline's cells are too short to overlap reliably by the
    second the summary needs)."""
    monkeypatch.chdir(tmp_path)
    timings = tmp_path / "logs" / "stages"
    timings.mkdir(parents=True)

    def stages(*spans):
        for old in timings.glob("*.json"):
            old.unlink()
        for name, start, seconds in spans:
            (timings / f"{name}.json").write_text(json.dumps(
                {"stage": name, "kind": name.split("@")[0], "seconds": seconds, "finished": start + seconds}))
        return progress.summary_lines()[0]
    assert stages(("posttrain@a", 100.0, 5.0), ("posttrain@b", 102.0, 5.0), ("report", 110.0, 2.0)) == \
        "where the time went (each stage's latest run, 12.0 s in all; 9.0 s while any ran, as cells ran side by side):"
    assert stages(("posttrain@a", 100.0, 5.0), ("posttrain@b", 105.0, 5.0)) == \
        "where the time went (each stage's latest run, 10.0 s in all):"


def test_a_cell_side_by_side_has_the_weights_it_gets_alone(repo):
    repo, env, _ = repo
    cell = repo / "artifacts/posttrain/ect/cmt/seed1/model.pt"
    side_by_side = torch.load(cell, map_location="cpu", weights_only=True)["ema"]
    sh("dvc repro -f -s posttrain@cmt-ect-1", repo, env)
    alone = torch.load(cell, map_location="cpu", weights_only=True)["ema"]
    assert side_by_side.keys() == alone.keys()
    assert all(torch.equal(side_by_side[k], alone[k]) for k in alone)


def test_jobs_are_refused_before_work_when_they_cannot_apply(repo):
    repo, env, _ = repo
    for args, message in ((["--jobs", "0"], "--jobs: a whole number >= 1 (got '0')"),
                          (["-j", "2", "-s", "data"], "--jobs 2 runs the whole pipeline")):
        out = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", *args], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and message in out.stderr, out.stderr
    params, before = repo / "params.yaml", _cells(repo)
    kept = params.read_text()
    try:  # a whole run checks params.yaml as `cmt-bench check` does, before DVC starts
        params.write_text(kept.replace("matmul: onednn", "matmul: fastest"))
        out = subprocess.run([sys.executable, "-m", "cmt_bench", "repro"], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=600)
    finally:
        params.write_text(kept)
    assert out.returncode == 2 and "compute.matmul" in out.stderr and "fastest" in out.stderr, out.stderr
    assert _cells(repo) == before


def test_jobs_are_read_in_every_spelling_argparse_takes():
    from cmt_bench.cli import split_jobs
    for argv in (["-j", "2"], ["-j2"], ["--jobs", "2"], ["--jobs=2"]):
        assert split_jobs(argv) == (2, []), argv
    assert split_jobs(["-j1", "-f", "-s", "data"]) == (1, ["-f", "-s", "data"])
    assert split_jobs(["-s", "data"]) == (None, ["-s", "data"])
    for argv, message in ((["-j0"], "got '0'"), (["-jx"], "got 'x'"), (["-j"], "got ''"),
                          (["-j2", "-s", "data"], "--jobs 2 runs the whole pipeline")):
        with pytest.raises(ValueError, match=message):
            split_jobs(argv)


def test_default_jobs_are_the_cores_over_the_threads_on_a_cpu():
    params = config.preset("smoke")
    assert schedule.default_jobs(params) == 1  # threads left to torch: one stage at a time
    cpu = config.override(params, {"compute.threads": 1, "compute.device": "cpu"}, "test")
    assert schedule.default_jobs(cpu) == len(os.sched_getaffinity(0))
    assert schedule.default_jobs(config.override(cpu, {"compute.processes": 2}, "test")) == 1


def test_a_cell_takes_its_evaluation_along_into_its_dvc_process():
    stages = {"starts": [], "posttrain@a": ["starts"], "posttrain@b": ["starts"], "evaluate@a": ["posttrain@a"],
              "evaluate@b": ["posttrain@b", "features"], "report": ["evaluate@a", "evaluate@b", "posttrain@a"]}
    pending = ["posttrain@a", "posttrain@b", "evaluate@a", "evaluate@b", "report"]
    assert schedule._follower("posttrain@a", stages, pending, {"starts"}) == ["evaluate@a"]
    # evaluate@b also waits on a stage not done yet; the report is not a cell
    assert schedule._follower("posttrain@b", stages, pending, {"starts"}) == []
    assert schedule._follower("posttrain@b", stages, pending, {"starts", "features"}) == ["evaluate@b"]
    assert schedule._follower("evaluate@a", stages, pending, {"starts"}) == []


def test_a_dvc_process_takes_a_share_of_the_ready_cells_each_with_its_evaluation():
    cells = [f"posttrain@{c}" for c in "abcdefgh"]
    stages = {"starts": [], **{c: ["starts"] for c in cells},
              **{c.replace("posttrain", "evaluate"): [c] for c in cells}, "report": ["starts"]}
    pending = [n for n in stages if n != "starts"]
    ready = [*cells, "report"]
    first, second = schedule.batches(ready, stages, pending, {"starts"}, jobs=2, free=2)
    assert first == ["posttrain@a", "evaluate@a", "posttrain@b", "evaluate@b", "posttrain@c", "evaluate@c"]
    assert second[0] == "posttrain@d" and len(second) == 2 * schedule.CELLS_PER_PROCESS == 6
    # one lane free: one process; the last cells spread over the lanes; a stage that is not a cell waits
    assert len(schedule.batches(ready, stages, pending, {"starts"}, jobs=2, free=1)) == 1
    assert schedule.batches(cells[-2:], stages, pending, {"starts"}, jobs=2, free=2) == [
        ["posttrain@g", "evaluate@g"], ["posttrain@h", "evaluate@h"]]
    assert schedule.batches(["report"], stages, pending, {"starts"}, jobs=2, free=2) == []
    assert schedule.batches(cells, stages, pending, {"starts"}, jobs=2, free=0) == []


def test_after_an_edit_the_code_stage_runs_first_and_only_what_it_stales_follows(repo):
    """`cmt-bench repro` after editing a report-only module: the code stage, then the report alone; no
    cell is handed to DVC only to be skipped (before the digests are rewritten, everything downstream
    of `code` looks stale)."""
    repo, env, _ = repo
    sh("dvc repro", repo, env)  # up to date first (a test above reran a cell, which stales its evaluation)
    html = repo / "cmt_bench/html.py"
    original = html.read_text()
    before = _cells(repo)
    try:
        html.write_text(original + "# edited\n")
        out = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", "--jobs", "2"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        after = _cells(repo)
        assert {name for name in after if after[name] != before.get(name)} == {"code", "report"}
        assert "didn't change" not in out.stdout + out.stderr
        assert "Data and pipelines are up to date" in sh("dvc status", repo, env)
    finally:
        html.write_text(original)
        sh("dvc repro", repo, env)
