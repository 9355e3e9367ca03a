"""`cmt-bench summary` (the end of `make toy`): the report's table and verdicts, where MLflow's UI shows
the comparison, and where the time went. It reads what the report stage left in summary.json and the
stages' timings, so it imports neither the report's plotting libraries nor an MLflow client (8 s of
start-up on 2 cores, against the ~2 s of the command line's own imports)."""
from __future__ import annotations

import json

from . import progress
from .config import Params
from .layout import report_dir
from .methods import label
from .mlflow_view import DEFAULT_UI, url


def mlflow_links(params: Params, views: dict) -> list[str]:
    """Where to see the comparison in MLflow's UI: `views` is what the report stage saved there
    ({"experiment_id": ..., "methods": [...]})."""
    if not views.get("methods"):
        return []
    from .tracking import tracking_uri  # MLflow's entities only, not a client
    uri = tracking_uri(params)
    if uri.startswith("http"):
        base, start = uri, []
    else:
        base = DEFAULT_UI
        start = [f"  mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri {uri}"]
    return ["MLflow (curves per init against device-hours and images seen):", *start,
            *(f"  {label(m)}: {url(base, views['experiment_id'], params.preset, m)}" for m in views["methods"])]


def lines(params: Params, links: bool = True) -> list[str]:
    """The summary: the report's lines, then (`links`) the MLflow links and where the time went."""
    path = report_dir(params.preset) / "summary.json"
    if not path.exists():
        return [f"no report yet at {path}: run `dvc repro`"]
    saved = json.loads(path.read_text())
    out = [f"report: {report_dir(params.preset) / 'report.md'}", *saved["summary"]]
    if links:
        out += [*mlflow_links(params, saved.get("mlflow_views", {})), *progress.summary_lines()]
    return out
