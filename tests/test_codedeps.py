"""dvc.yaml's code dependencies are each stage's import closure (cmt_bench.codedeps), checked here
against the committed dvc.yaml; the pipeline test checks what DVC makes of them."""
import shutil

from conftest import ROOT

from cmt_bench import codedeps


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    assert codedeps.mismatches(ROOT / "dvc.yaml") == {}


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
    assert {"cmt_bench/methods/${item.method}.py", "cmt_bench/inits/${item.init}.py"} <= set(posttrain)
    assert "cmt_bench/methods/ect.py" not in posttrain  # the other methods' modules are not a cell's code
    assert {"cmt_bench/methods", "cmt_bench/inits", "cmt_bench/html.py"} <= set(report)
    assert "cmt_bench/report.py" not in codedeps.stage_code("posttrain")


def test_write_restores_a_removed_dependency_and_keeps_the_rest(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    shutil.copy(ROOT / "dvc.yaml", dvc_yaml)
    original = dvc_yaml.read_text()
    assert codedeps.write(dvc_yaml) == [] and dvc_yaml.read_text() == original  # already exact: untouched
    dvc_yaml.write_text(original.replace("      - cmt_bench/sources.py\n", "", 1))
    assert "data" in codedeps.mismatches(dvc_yaml)
    assert codedeps.write(dvc_yaml) == ["data"]
    assert dvc_yaml.read_text() == original  # comments, order and formatting kept
