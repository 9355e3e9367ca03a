"""Each stage's code is its import closure (cmt_bench.codedeps), hashed by the code stage into one file
per stage that the stage depends on in dvc.yaml, checked here against the committed dvc.yaml; the
pipeline test checks what DVC makes of them."""
import hashlib
import json
import shutil

from conftest import ROOT

from cmt_bench import codedeps


def test_each_dvc_yaml_stage_depends_on_its_code_file():
    assert codedeps.mismatches(ROOT / "dvc.yaml") == {}


def test_the_code_stage_hashes_each_stage_s_modules(tmp_path):
    codedeps.write_digests(tmp_path)
    assert {p.stem for p in tmp_path.iterdir()} == set(codedeps.STAGES)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report) == codedeps.stage_code("report")
    assert report["cmt_bench/html.py"] == hashlib.sha256((ROOT / "cmt_bench/html.py").read_bytes()).hexdigest()
    posttrain = json.loads((tmp_path / "posttrain.json").read_text())
    assert "cmt_bench/train.py" in posttrain and "cmt_bench/html.py" not in posttrain
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    codedeps.write_digests(tmp_path)  # the same code, the same bytes: DVC reruns nothing
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_closure_follows_relative_lazy_and_package_imports():
    # scoring imports fidelity inside a function (torch-fidelity only where images are scored)
    assert "cmt_bench.fidelity" in codedeps.closure(["cmt_bench.scoring"])
    # `from .. import data as datasets` in stages/data.py, and the parent packages of what it imports
    data = codedeps.closure(["cmt_bench.stages.data"])
    assert {"cmt_bench.data", "cmt_bench.sources", "cmt_bench.stages", "cmt_bench"} <= data
    # the report layer reads evidence, never a stage body
    assert not any(m.startswith("cmt_bench.stages") for m in codedeps.closure(["cmt_bench.report"], "all"))


def test_registry_members_count_only_where_they_run():
    data, posttrain, report = (codedeps.stage_code(s) for s in ("data", "posttrain", "report"))
    assert "cmt_bench/methods/__init__.py" in data and "cmt_bench/methods/ect.py" not in data
    assert "cmt_bench/nets.py" not in data and "cmt_bench/sources.py" in data
    assert codedeps.item_code("posttrain") == ["cmt_bench/methods/${item.method}.py", "cmt_bench/inits/${item.init}.py"]
    assert "cmt_bench/methods/ect.py" not in posttrain  # the other methods' modules are not a cell's code
    assert "cmt_bench/losses/average_velocity.py" in posttrain  # what a member imports: every cell's code
    # the studies and the report run every member: the whole folders, so a new member changes their digest
    assert {"cmt_bench/methods/ect.py", "cmt_bench/inits/cmt.py", "cmt_bench/html.py"} <= set(report)
    assert "cmt_bench/report.py" not in posttrain


def test_write_restores_a_removed_dependency_and_keeps_the_rest(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    shutil.copy(ROOT / "dvc.yaml", dvc_yaml)
    original = dvc_yaml.read_text()
    assert codedeps.write(dvc_yaml) == [] and dvc_yaml.read_text() == original  # already exact: untouched
    dvc_yaml.write_text(original.replace("      - artifacts/code/data.json\n", "", 1))
    assert "data" in codedeps.mismatches(dvc_yaml)
    assert codedeps.write(dvc_yaml) == ["data"]
    assert dvc_yaml.read_text() == original  # comments, order and formatting kept
