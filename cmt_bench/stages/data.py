"""The data stage: the preset's dataset as webdataset shards with a manifest."""
from __future__ import annotations

import shutil

from .. import data as datasets
from ..config import Params
from ..data import write_json
from ..layout import out_dir
from ..tracking import Tracker


def run(params: Params) -> None:
    out = out_dir("data")
    shutil.rmtree(out, ignore_errors=True)
    manifest = datasets.make_dataset(params.data, params.seed, out)
    tracker = Tracker.open(params, "data", stage_params={"data": params.data.model_dump()})
    tracker.log_artifact(out / "manifest.json")
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "data",
                                  "counts": {k: v["count"] for k, v in manifest["splits"].items()}})
