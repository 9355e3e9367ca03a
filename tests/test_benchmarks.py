"""The benchmarks' own arithmetic, on made-up timings (the benchmarks themselves are measurements)."""
import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import pipeline  # noqa: E402


def test_idle_core_seconds_count_each_stage_as_its_processes(tmp_path):
    """A stage holds one core, a study its workers: with 2 cores, data and pretrain alone leave one idle
    (5 + 40 s), two cells side by side none, the tail of one cell one (1 + 10 s), a 2-worker study none."""
    stages = tmp_path / "logs" / "stages"
    stages.mkdir(parents=True)
    for name, start, end in (("data", 0, 5), ("pretrain", 5, 45), ("posttrain@a", 45, 80), ("posttrain@b", 46, 70),
                             ("studies@s", 80, 100)):
        (stages / f"{name}.json").write_text(json.dumps({"stage": name, "seconds": end - start, "finished": 1000 + end}))
    (tmp_path / "artifacts" / "studies" / "s").mkdir(parents=True)
    (tmp_path / "artifacts" / "studies" / "s" / "study.json").write_text(json.dumps({"workers": 2}))
    out = pipeline.idle(tmp_path, cores=2, top=2)
    assert out["core_seconds"] == 56 and out["window_s"] == 100
    assert out["longest"] == [{"from_s": 5, "seconds": 40, "idle_cores": 1, "running": ["pretrain"]},
                              {"from_s": 70, "seconds": 10, "idle_cores": 1, "running": ["posttrain@a"]}]
