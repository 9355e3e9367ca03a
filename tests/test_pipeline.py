"""A real `dvc repro` of the smoke preset (two post-training seeds) in a temporary git repo, read
back from MLflow, with DVC's metrics and plots over its outputs."""
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from browser import bounding_box, colour_mask, require_chromium, screenshot
from cmt_bench import mlflow_view, warm
from conftest import make_repo, mlflow_runs as _runs, mlflow_server, sh, stale_after_editing


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo, env = make_repo(tmp_path_factory.mktemp("pipeline"), "smoke", {"posttrain": {"seeds": [0, 1]}})
    log = sh("dvc repro", repo, env)
    return repo, env, log


def test_repro_logs_every_stage_and_init(repo):
    repo, _, log = repo
    client, runs = _runs(repo)
    post = [r for r in runs if r.data.tags.get("stage") == "posttrain"]
    assert sorted((r.data.tags["method"], r.data.tags["init"], r.data.tags["seed"]) for r in post) == \
        [(m, i, s) for m in ("ect", "meanflow") for i in ("cmt", "diffusion", "random") for s in ("0", "1")]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("stage") not in
               ("pipeline", "study_trial")}
    assert len(parents) == 1, "all stages of one pipeline run hang under one parent run"
    assert {r.data.tags["stage"] for r in runs} >= {"pipeline", "data", "features", "pretrain", "trajectories",
                                                    "midtrain", "posttrain", "evaluate", "study", "study_trial"}
    for r in post:
        assert r.info.status == "FINISHED" and r.data.tags["git_sha"]
        assert r.info.run_name == f"posttrain-{r.data.tags['method']}-{r.data.tags['init']}-seed{r.data.tags['seed']}"
        curve = client.get_metric_history(r.info.run_id, "fd_raw_2step_n500")  # the key says its sample count
        hours = client.get_metric_history(r.info.run_id, "device_hours")
        seen = client.get_metric_history(r.info.run_id, "images_seen")
        assert len(curve) > 1
        assert {m.step for m in curve} == {m.step for m in hours} == {m.step for m in seen}
        assert max(m.value for m in seen) == 8192 and max(m.value for m in hours) > 0
    traj = next(r for r in runs if r.data.tags.get("stage") == "trajectories")
    assert traj.data.metrics["teacher_nfe"] == 512 * 8 * 2  # Heun: 2 evaluations per step
    assert traj.data.metrics["flops"] > 0 and traj.data.metrics["flops"] % 512 == 0  # one trajectory's count x 512
    # counted FLOPs: logged beside wall time, and the same work counts the same whatever the init
    final_flops = {}
    for r in post:
        flops = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "flops"))
        assert flops[0][1] == 0 and all(b > a for (_, a), (_, b) in zip(flops, flops[1:]))
        final_flops.setdefault((r.data.tags["method"], r.data.tags["seed"]), set()).add(flops[-1][1])
    assert all(len(counts) == 1 for counts in final_flops.values()), final_flops
    for r in post:  # each cell's output names its run, so the report reads the right curves
        tags = r.data.tags
        run_json = (repo / f"artifacts/posttrain/{tags['method']}/{tags['init']}/seed{tags['seed']}/run.json").read_text()
        assert r.info.run_id in run_json
    # each method's 2-step sampler (its registry entry), recorded by the cell and used by its evaluation
    samplers = {(r.data.tags["method"], r.data.tags["two_step"]) for r in runs
                if r.data.tags.get("stage") == "evaluate"}
    assert samplers == {("ect", "renoise"), ("meanflow", "chain")}


def test_report_and_summary(repo):
    repo, env, log = repo
    report = (repo / "reports/smoke/report.md").read_text()
    for method in ("ECT", "MeanFlow"):
        assert f"| 1 | {method} from CMT reaches the diffusion init's final `fd_raw_2step`" in report
        assert f"| 2 | {method} from CMT reaches the random init's final `fd_raw_2step`" in report
    assert "| 3 | MeanFlow from CMT reaches the from-scratch" in report
    assert "| 4 | CMT makes ECT post-training less sensitive to hyperparameters (study `smoke_ect`)" in report
    # whichever verdicts were measured: claims 1 and 2 per method, then 3 and 4
    assert len(re.findall(r"\*\*(holds|does not hold|not resolved|not tested) at this scale\*\*", report)) == 6
    assert "2 seed(s) each (0, 1)" in report and "mean ± sd" in report
    for png in ("metric_vs_compute.png", "samples.png"):
        assert (repo / "reports/smoke" / png).stat().st_size > 10_000
    html = (repo / "reports/smoke/report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    summary = sh("python -m cmt_bench summary", repo, env).strip().splitlines()
    assert summary[0] == "report: reports/smoke/report.md"
    assert [line.split()[:2] for line in summary[2:8]] == [[m, i] for m in ("ect", "meanflow")
                                                          for i in ("random", "diffusion", "cmt")]
    assert [line.split(":")[0] for line in summary[8:14]] == ["claim 1 (ECT)", "claim 1 (MeanFlow)", "claim 2 (ECT)",
                                                             "claim 2 (MeanFlow)", "claim 3 (MeanFlow)", "claim 4 (ECT)"]
    # then where to look in MLflow's UI, and where the time went
    assert summary[14].startswith("MLflow") and "mlflow ui --host 127.0.0.1" in summary[15]
    assert [line.split(":")[0].strip() for line in summary[16:18]] == ["ECT", "MeanFlow"]
    assert "viewStateShareKey=cmt-bench-smoke-ect" in summary[16]
    assert summary[18].startswith("where the time went")
    kinds = {line[2:26].strip(): line for line in summary[19:]}  # "  <kind, padded to 24> <time>  <detail>"
    assert "starting weights" in kinds, summary[19:]
    assert re.fullmatch(r"\s+post-training\s+[\d.]+ (s|min)\s+12 cells, training steps [\d.]+ (s|min)",
                        kinds["post-training"])


def test_repro_prints_one_line_per_stage(repo):
    """`cmt-bench repro` (what `make toy` runs): DVC's own lines per stage give way to the stage's
    closing line; outside a terminal no bars."""
    repo, env, _ = repo
    out = sh("python -m cmt_bench repro -f -s study_index", repo, {k: v for k, v in env.items() if k != "CI"})
    assert "Running stage" not in out and "Updating lock file" not in out and "\r" not in out
    assert re.search(r"^done\s+study_index\s+[\d.]+ s$", out, re.M), out
    missing = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", "nope"], cwd=repo, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr  # DVC's errors still show


def test_mlflow_ui_opens_on_the_comparison(repo, tmp_path):
    """The link `cmt-bench summary` prints, in headless Chromium against a real MLflow server over
    the pipeline's store: the ECT runs' curves in each init's group colour (MLflow's own palette);
    the same runs page without the saved view draws none (negative control)."""
    require_chromium()
    repo, _, _ = repo
    client, _ = _runs(repo)
    exp = client.get_experiment_by_name("cmt_bench").experiment_id
    with mlflow_server(tmp_path, f"sqlite:///{repo / 'mlflow.db'}") as base:
        link = mlflow_view.url(base, exp, "smoke", "ect")
        bare = f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART"
        assert _curves_per_init(link), "the comparison view drew no curve per init"
        assert not _curves_per_init(bare, tries=1), "the check passes without the saved view"


# MLflow colours a group by a checksum of "tag.init.<value>" over its palette (3.17)
MLFLOW_GROUP_RGB = {"cmt": (0x93, 0x32, 0x0b), "diffusion": (0x44, 0x54, 0x61), "random": (0xb4, 0x50, 0x91)}


def _curves_per_init(url: str, tries: int = 2) -> bool:
    """Each init's colour covers >= 200 pixels of the chart area (right of the run list, left of
    the assistant panel). The charts load after the page: 60 s of virtual time drew them in 19 of
    19 tries, less sometimes did not; a second try guards against a slow load."""
    for _ in range(tries):
        area = screenshot(url, size=(1600, 1200), wait_ms=60000, timeout=120)[250:1200, 540:1180]
        if all(colour_mask(area, rgb, tol=12).sum() >= 200 for rgb in MLFLOW_GROUP_RGB.values()):
            return True
    return False


def test_html_report_shows_its_figures_in_chromium(repo, tmp_path):
    """The real report.html in headless Chromium, with everything but the compute figure hidden:
    the CMT (red) and diffusion (blue) curves must be drawn across the figure area."""
    require_chromium()
    repo, _, _ = repo
    html = (repo / "reports/smoke/report.html").read_text()
    only_figure = '<style>body > :not(p:has(img[alt="metric versus compute"])) { display: none }</style></head>'
    page = tmp_path / "figure.html"  # a folder with nothing else: the figure must come from inside the HTML
    page.write_text(html.replace("</head>", only_figure, 1))
    pixels = screenshot(page, size=(1000, 1000))
    for colour in ((0xd6, 0x27, 0x28), (0x1f, 0x77, 0xb4)):  # report.PALETTE: cmt, diffusion
        box = bounding_box(colour_mask(pixels, colour, tol=40))
        assert box is not None and box[2] > 300 and box[3] > 600, f"no curve of colour {colour} drawn: {box}"
    broken = tmp_path / "broken.html"  # the same check on a page whose figure cannot load must fail
    figure = '<img alt="metric versus compute" src="data:image/png;base64,'  # other images may precede it
    assert figure in html
    unreachable = figure.replace("data:image/png;base64,", "https://cdn.invalid/x.png?")
    broken.write_text(page.read_text().replace(figure, unreachable))
    assert bounding_box(colour_mask(screenshot(broken, size=(1000, 1000)), (0xd6, 0x27, 0x28), tol=40)) is None


def test_dvc_metrics_and_plots_read_the_outputs(repo):
    repo, env, _ = repo
    metrics = json.loads(sh("dvc metrics show --json", repo, env))
    files = next(iter(metrics.values()))["data"]
    claims = files["reports/smoke/claims.json"]["data"]
    study = claims["claim4_smoke_ect"]
    assert study["verdict"].endswith("at this scale") and 0 <= study["within_best_cmt"] <= 1
    assert set(study) >= {"difference_vs_random", "difference_vs_diffusion"}
    assert files["artifacts/evaluate/ect/cmt/seed1/metrics.json"]["data"]["fd_raw_2step_n1000"] > 0
    assert "fd_raw_floor_n500" in files["artifacts/features.json"]["data"]["floor"]
    plots = json.loads(sh("dvc plots show --json", repo, env))["data"]
    assert sorted(plots) == ["reports/smoke/curves/ect.csv", "reports/smoke/curves/meanflow.csv",
                             "reports/smoke/metric_vs_compute.png", "reports/smoke/samples.png"]
    fields = {row["field"] for row in plots["reports/smoke/curves/ect.csv"][0]["content"]["data"]["values"]}
    assert fields == {"random", "diffusion", "cmt"}  # one line per init


def test_second_repro_is_a_no_op(repo):
    repo, env, _ = repo
    assert "Data and pipelines are up to date" in sh("dvc repro", repo, env)


def test_each_study_stage_depends_on_its_own_spec_only(repo):
    """A study is a stage studies@<name> that reads experiments/studies/<name>.yaml: a new spec beside it
    leaves everything that ran up to date; editing the listed spec makes that stage stale, nothing else."""
    repo, env, _ = repo
    spec, other = repo / "experiments/studies/smoke_ect.yaml", repo / "experiments/studies/smoke_other.yaml"
    original = spec.read_text()
    try:
        other.write_text(original)
        assert json.loads(sh("dvc status --json", repo, env)) == {}
        spec.write_text(original + "# edited\n")
        stale = set(json.loads(sh("dvc status --json", repo, env)))
    finally:
        spec.write_text(original)
        other.unlink()
    assert stale == {"studies@smoke_ect"}


def test_editing_code_stales_exactly_the_stages_that_run_it(repo):
    """Every stage depends on the modules it imports: the network reruns every stage that builds
    one (and the report, whose registry modules import it), not the data or the metric; a data
    source reruns the data stage (and what follows); a report-only module reruns the report alone;
    a method's module reruns its own cells, not the teacher nor another method's cells."""
    repo, env, _ = repo
    cells = [f"posttrain@{i}-{m}-{s}" for i in ("random", "diffusion", "cmt") for m in ("ect", "meanflow")
             for s in (0, 1)]
    nets = stale_after_editing(repo, env, "cmt_bench/nets.py")
    assert {"pretrain", "trajectories", "midtrain@ect", "midtrain@meanflow", *cells, "studies@smoke_ect",
            "report"} <= nets and not nets & {"data", "features"}, nets
    assert {"data", "features", "pretrain"} <= stale_after_editing(repo, env, "cmt_bench/sources.py")
    assert stale_after_editing(repo, env, "cmt_bench/html.py") == {"report"}
    ect = stale_after_editing(repo, env, "cmt_bench/methods/ect.py")
    assert ect == {c for c in cells if "-ect-" in c} | {"studies@smoke_ect", "report"}, ect
    assert "Data and pipelines are up to date" in sh("dvc status", repo, env)


def test_a_cell_reruns_only_when_its_own_starting_weights_change(repo):
    """A new teacher and a new ECT mid-training (their weights nudged in place, the starts stage
    rerun) stale the diffusion cells and the CMT cells of ECT, never a random-init cell nor the CMT
    cells of MeanFlow, whose starting weights are the same bytes. Restoring them leaves nothing stale."""
    repo, env, _ = repo
    nudged = [repo / "artifacts/pretrain/model.pt", repo / "artifacts/midtrain/ect/model.pt"]
    originals = [path.read_bytes() for path in nudged]
    cells = {f"posttrain@{i}-{m}-{s}" for i in ("random", "diffusion", "cmt") for m in ("ect", "meanflow")
             for s in (0, 1)}
    try:
        for path in nudged:
            state = torch.load(path, weights_only=True)
            state["ema"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state["ema"].items()}
            torch.save(state, path)
        sh("dvc repro -s starts", repo, env)
        stale = set(json.loads(sh("dvc status --json", repo, env))) & cells
    finally:
        for path, original in zip(nudged, originals):
            path.write_bytes(original)
        sh("dvc repro -s starts", repo, env)
    assert stale == {c for c in cells if "diffusion" in c or "cmt-ect" in c}, stale
    assert "Data and pipelines are up to date" in sh("dvc status", repo, env)


def test_studies_command_outside_dvc_reuses_the_finished_study(repo):
    """`cmt-bench studies` (no DVC) runs every listed study, then writes the index; the smoke study's
    trials are all in the repo's Optuna storage already, so it adds none and rewrites the same results."""
    import optuna
    repo, env, _ = repo
    storage = f"sqlite:///{repo / 'optuna.db'}"
    names = json.loads((repo / "artifacts/studies/smoke_ect/study.json").read_text())["studies"].values()
    before = {n: len(optuna.load_study(study_name=n, storage=storage).trials) for n in names}
    trials = (repo / "artifacts/studies/smoke_ect/trials.csv").read_text()
    (repo / "artifacts/studies/index.json").unlink()
    sh("python -m cmt_bench studies", repo, env)
    timing = json.loads((repo / "logs/stages/studies@smoke_ect.json").read_text())  # for `cmt-bench summary`
    assert timing["kind"] == "studies" and timing["seconds"] > 0
    assert json.loads((repo / "artifacts/studies/index.json").read_text()) == {"specs": ["smoke_ect"]}
    assert {n: len(optuna.load_study(study_name=n, storage=storage).trials) for n in names} == before
    assert (repo / "artifacts/studies/smoke_ect/trials.csv").read_text() == trials


def test_a_trajectory_setting_leaves_the_teacher_alone(repo):
    """Ablating the trajectory solver or steps must not retrain the teacher: DVC sees the
    trajectories stage as changed (and reruns what follows from it), pre-training not."""
    repo, env, _ = repo
    path = repo / "params.yaml"
    original = path.read_text()
    changed = yaml.safe_load(original)
    changed["trajectories"].update(steps=2 * changed["trajectories"]["steps"], solver="euler")
    try:
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        stale = set(json.loads(sh("dvc status --json", repo, env)))
    finally:
        path.write_text(original)
    assert "trajectories" in stale and not stale & {"data", "features", "pretrain"}, stale


def test_temp_experiment_logs_to_the_repo_store(repo):
    """`dvc exp run --temp` runs in a copy under .dvc/tmp/exps; the store must stay the repo's."""
    repo, env, _ = repo
    _, before = _runs(repo)
    sh("dvc exp run --temp -n ect-q32 -S posttrain.ect.q=32", repo, env)
    _, after = _runs(repo)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    post = [r for r in new if r.data.tags.get("stage") == "posttrain"]
    assert sorted((r.data.tags["init"], r.data.tags["seed"]) for r in post) == \
        [(i, s) for i in ("cmt", "diffusion", "random") for s in ("0", "1")]
    assert {r.data.tags["method"] for r in post} == {"ect"}  # an ECT param leaves the MeanFlow cells alone
    assert all(r.data.tags.get("dvc_exp_name") == "ect-q32" for r in new if r.data.tags.get("stage") != "pipeline")


def test_trajectories_are_identical_across_runs(repo):
    """Same seed, same teacher: DPM-Solver++ trajectories on the log-SNR grid come out byte-identical
    (the manifest holds each shard's sha256). Last in this module: it rewrites the stage's outputs."""
    repo, env, _ = repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["trajectories"].update(solver="dpm_solver_pp_2m", grid="logsnr")
    (repo / "dpm.yaml").write_text(yaml.safe_dump(params))
    manifests = []
    for _ in range(2):
        sh("python -m cmt_bench --params dpm.yaml trajectories", repo, env)
        manifests.append(json.loads((repo / "artifacts/trajectories/manifest.json").read_text()))
    assert manifests[0] == manifests[1]
    assert manifests[0]["solver"] == "dpm_solver_pp_2m" and manifests[0]["nfe_per_trajectory"] == 8

    # mid-training for MeanFlow runs CMT-MF on them (ECT's runs CMT-CM) and says so in MLflow
    sh("python -m cmt_bench --params dpm.yaml midtrain --method meanflow", repo, env)
    client, _ = _runs(repo)
    for method, variant in (("meanflow", "cmt_mf"), ("ect", "cmt_cm")):
        run_id = json.loads((repo / f"artifacts/midtrain/{method}/run.json").read_text())["run_id"]
        assert client.get_run(run_id).data.tags["method"] == variant
    assert not (repo / "checkpoints/midtrain-meanflow").exists()  # finished: resumable state dropped


def test_posttrain_rerun_gives_identical_weights(repo):
    """Every random choice is seeded: rerunning a cell from the diffusion init (whose gap
    embedding is partly fresh) reproduces its weights bit for bit."""
    repo, env, _ = repo
    model = repo / "artifacts/posttrain/ect/diffusion/seed1/model.pt"
    before = torch.load(model, weights_only=True)
    sh("python -m cmt_bench.stages posttrain --init diffusion --method ect --seed 1", repo, env)
    after = torch.load(model, weights_only=True)
    assert all(torch.equal(before["net"][k], after["net"][k]) for k in before["net"])


def test_study_trials_are_nested_runs_and_fill_claim_4(repo, tmp_path):
    """The smoke study (experiments/studies/smoke_ect.yaml) ran in `dvc repro`: one Optuna study per
    init in the repo's SQLite storage, each trial an MLflow run under its study's run, which hangs under
    the pipeline run; the report renders the sensitivity section; optuna-dashboard serves the storage."""
    import optuna
    import pandas as pd
    repo, env, _ = repo
    client, runs = _runs(repo)
    storage = f"sqlite:///{repo / 'optuna.db'}"
    results = json.loads((repo / "artifacts/studies/smoke_ect/study.json").read_text())
    pipeline = next(r.data.tags["mlflow.parentRunId"] for r in runs  # `dvc repro`'s, not the temp experiment's
                    if r.data.tags["stage"] == "data" and "dvc_exp_name" not in r.data.tags)
    for init, name in results["studies"].items():
        study = optuna.load_study(study_name=name, storage=storage)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) >= 5 and study.user_attrs["init"] == init
        study_run = client.get_run(study.user_attrs["mlflow_run_id"])
        assert study_run.data.tags["mlflow.parentRunId"] == pipeline and study_run.info.status == "FINISHED"
        # two workers may finish a trial past the count (the other's last): the analysis counts the first 5
        assert study_run.data.metrics["finished"] == 5
        for t in finished:
            run = client.get_run(t.user_attrs["mlflow_run_id"])
            assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
            assert run.data.tags["trial_number"] == str(t.number) and run.data.tags["init"] == init
            assert float(run.data.params["trial.posttrain.train.lr"]) == pytest.approx(t.params["posttrain.train.lr"])
            assert run.data.params["posttrain.train.budget_images"] == "4096"  # the study's fixed budget
            if t.state.name == "COMPLETE":
                assert run.data.metrics["fd_raw_2step_n1000"] == pytest.approx(t.value)
            else:
                assert run.info.status == "KILLED" and run.data.tags["outcome"] in ("pruned", "diverged")
    trials = pd.read_csv(repo / "artifacts/studies/smoke_ect/trials.csv")
    assert set(trials["init"]) == {"random", "diffusion", "cmt"} and "posttrain.train.lr" in trials
    report = (repo / "reports/smoke/report.md").read_text()
    assert "## Sensitivity to hyperparameters (Optuna)" in report and "| cmt | " in report
    for png in ("spread.png", "slices.png", "contours.png"):
        assert (repo / "reports/smoke/studies/smoke_ect" / png).stat().st_size > 10_000

    from conftest import free_port
    import subprocess
    import time
    import urllib.request
    port = free_port()
    dash = subprocess.Popen(["optuna-dashboard", storage, "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while body is None and time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
            except OSError:
                time.sleep(0.3)
        names = {s["study_name"] for s in json.loads(body)["study_summaries"]}
        assert set(results["studies"].values()) <= names
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_repro_runs_stages_in_a_warm_interpreter_with_the_same_results(repo):
    """`cmt-bench repro` runs each stage in a fork of a process that imported torch, MLflow and the
    package once (warm.py): a post-training cell and its evaluation rerun there end with the weights
    and scores `dvc repro` gave; after a module changes on disk a stage runs in a fresh interpreter."""
    import os
    repo, env, _ = repo
    cell = "cmt-ect-0"
    weights = torch.load(repo / "artifacts/posttrain/ect/cmt/seed0/model.pt", weights_only=True)
    scores = (repo / "artifacts/evaluate/ect/cmt/seed0/metrics.json").read_text()
    sh(f"python -m cmt_bench repro -f -s posttrain@{cell} evaluate@{cell}", repo, env)
    timing = {s: json.loads((repo / f"logs/stages/{s}@{cell}.json").read_text()) for s in ("posttrain", "evaluate")}
    assert timing["posttrain"]["warm"] and timing["evaluate"]["warm"]
    again = torch.load(repo / "artifacts/posttrain/ect/cmt/seed0/model.pt", weights_only=True)
    assert all(torch.equal(weights[k][n], again[k][n]) for k in ("net", "ema") for n in weights[k])
    assert (repo / "artifacts/evaluate/ect/cmt/seed0/metrics.json").read_text() == scores
    with warm.server(cwd=repo) as served:
        stage = "python -m cmt_bench.stages evaluate --init cmt --method ect --seed 0"
        ran_warm = []
        for edit in (False, True):
            if edit:  # a module "edited" while the server runs: the server's copy is stale
                source = repo / "cmt_bench/scoring.py"
                os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
            sh(stage, repo, {**env, warm.ENV: served[warm.ENV]})
            ran_warm.append(json.loads((repo / f"logs/stages/evaluate@{cell}.json").read_text())["warm"])
            assert (repo / "artifacts/evaluate/ect/cmt/seed0/metrics.json").read_text() == scores
    assert ran_warm == [True, False]
    sh("python -m cmt_bench repro", repo, env)  # the report reads the new runs: the pipeline is whole again


def _plan_rows(text: str) -> dict[str, list[str]]:
    """The plan's table: stage -> [runs, steps/run, s/step, device-hours, wall time, FLOPs]."""
    rows = {}
    for line in text.splitlines():
        if m := re.match(r"(\S.*?)\s{2,}(\d+)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+ (?:s|min|h))\s+(\S+)", line):
            rows[m[1]] = list(m.groups()[1:])
    return rows


def test_plan_projects_every_stage_and_counts_the_flops_the_run_logged(repo):
    """`cmt-bench plan` times every training stage and projects it; its FLOPs are counts, so they equal
    what the real run logged for the same budgets (the teacher, and an ECT cell: fixed-shape steps)."""
    repo, env, _ = repo
    text = sh("python -m cmt_bench plan --steps 2", repo, env)
    assert "a projection, not a measurement" in text
    rows = _plan_rows(text)
    assert set(rows) >= {"pretrain", "trajectories", "midtrain for ect (CMT-CM)", "midtrain for meanflow (CMT-MF)",
                         "posttrain ect", "posttrain meanflow", "study smoke_ect (ect)"}, text
    assert rows["posttrain ect"][0] == "6"  # 3 inits x 2 seeds
    assert all(float(r[3]) > 0 for r in rows.values()), text
    total = re.search(r"^in all\s+(\S+)\s+\S+ (?:s|min|h)\s+(\S+)$", text, re.M)
    assert float(total[1]) == pytest.approx(sum(float(r[3]) for r in rows.values()), rel=0.05)
    assert float(total[2]) == pytest.approx(sum(float(r[5]) for r in rows.values()), rel=0.01)
    client, runs = _runs(repo)
    logged = {(r.data.tags["stage"], r.data.tags.get("method")): r.data.metrics["flops"] for r in runs
              if r.data.tags.get("stage") in ("pretrain", "posttrain")}
    assert float(rows["pretrain"][5]) == pytest.approx(logged["pretrain", "flow_matching"], rel=1e-2)  # 3 digits shown
    assert float(rows["posttrain ect"][5]) == pytest.approx(6 * logged["posttrain", "ect"], rel=1e-2)
    # --batch: timed and counted at a smaller batch, scaled to the stage's: an ECT step's FLOPs are per sample
    small = _plan_rows(sh("python -m cmt_bench plan --steps 2 --batch 4", repo, env))
    assert float(small["posttrain ect"][5]) == pytest.approx(float(rows["posttrain ect"][5]), rel=1e-2)


def test_a_projection_over_the_budget_stops_before_any_work(repo):
    repo, env, _ = repo
    plan = subprocess.run([sys.executable, "-m", "cmt_bench", "plan", "--steps", "1", "--budget-hours", "1e-12"],
                          cwd=repo, env=env, capture_output=True, text=True)
    assert plan.returncode == 3 and "over budget" in plan.stderr
    pretrain_runs = sum(r.data.tags.get("stage") == "pretrain" for r in _runs(repo)[1])
    run = subprocess.run([sys.executable, "-m", "cmt_bench", "repro", "-f", "-s", "pretrain"], cwd=repo,
                         env={**env, "CMT_BENCH_BUDGET_HOURS": "1e-12"}, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 3 and "exceed $CMT_BENCH_BUDGET_HOURS = 1e-12" in run.stderr and "not run" in run.stderr
    assert sum(r.data.tags.get("stage") == "pretrain" for r in _runs(repo)[1]) == pretrain_runs  # nothing ran
    bad = subprocess.run([sys.executable, "-m", "cmt_bench", "repro"], cwd=repo,
                         env={**env, "CMT_BENCH_BUDGET_HOURS": "two"}, capture_output=True, text=True)
    assert bad.returncode == 3 and "$CMT_BENCH_BUDGET_HOURS: a number of device-hours (got 'two')" in bad.stderr
