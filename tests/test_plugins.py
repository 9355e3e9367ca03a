"""Methods and inits are plug-ins: a test-only module dropped into cmt_bench/methods/ (or inits/)
runs through a real smoke `dvc repro` to its own rows in the report, no other file touched."""
import hashlib
import json
from pathlib import Path

import pytest
from conftest import ROOT, make_repo, sh, stale_after_editing

PLUGINS = Path(__file__).parent / "plugins"


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    extra = {"cmt_bench/methods/fm_baseline.py": PLUGINS / "fm_baseline.py",
             "cmt_bench/inits/half_teacher.py": PLUGINS / "half_teacher.py"}
    repo, env = make_repo(tmp_path_factory.mktemp("plugins"), "smoke",
                          {"posttrain": {"methods": ["fm_baseline"], "inits": ["random", "diffusion", "cmt", "half_teacher"],
                                         "seeds": [0]}, "studies": {"specs": []}}, extra=extra)
    log = sh("dvc repro", repo, env)
    return repo, env, log


def test_the_plugins_touch_no_other_file(repo):
    repo, _, _ = repo
    added = {"methods/fm_baseline.py", "inits/half_teacher.py"}
    theirs, ours = _tree(repo / "cmt_bench"), _tree(ROOT / "cmt_bench")
    assert set(theirs) - set(ours) == added
    assert {k: v for k, v in theirs.items() if k not in added} == ours


def test_a_new_method_and_init_run_to_the_report(repo):
    repo, env, log = repo
    assert "posttrain@half_teacher-fm_baseline-0" in log and "midtrain@fm_baseline" in log
    params = (repo / "params.yaml").read_text()
    assert "fm_baseline:" in params  # `cmt-bench preset` wrote the method's own section and CMT variant
    report = (repo / "reports/smoke/report.md").read_text()
    assert "| 1 | FM-baseline from CMT reaches the diffusion init's final" in report
    assert "| 2 | FM-baseline from CMT reaches the random init's final" in report
    assert "the paper gives no figure for FM-baseline" in report
    assert "### FM-baseline" in report and "| half_teacher |" in report
    assert "half-teacher = pre-training + post-training" in report  # its upstream counts in its total
    claims = json.loads((repo / "reports/smoke/claims.json").read_text())
    assert {"claim1_fm_baseline", "claim2_fm_baseline"} <= set(claims)
    finals = (repo / "reports/smoke/finals.csv").read_text()
    assert "fm_baseline,half_teacher,0" in finals
    assert "Data and pipelines are up to date" in sh("dvc repro", repo, env)
    assert "every stage depends on the code it runs" in sh("python -m cmt_bench deps", repo, env)


def test_editing_a_plugin_reruns_only_what_runs_it(repo):
    """The init's own cells and the report; also `starts`, which builds every cell's starting weights
    (no training) and reruns only the cells whose digest it changes."""
    repo, env, _ = repo
    stale = stale_after_editing(repo, env, "cmt_bench/inits/half_teacher.py")
    assert stale == {"posttrain@half_teacher-fm_baseline-0", "starts", "report"}, stale
