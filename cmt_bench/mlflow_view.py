"""A link that opens the MLflow UI (3.x) on the post-training comparison: the runs of one method,
one colour per init (MLflow's group-by), quality against device-hours and against images seen.

How MLflow's UI (3.17) does it, read from its bundle and checked with headless Chromium
(tests/test_pipeline.py): the runs page loads a saved view (search filter, charts, group-by) from the
experiment tag `mlflow.sharedViewState.<key>` when the URL carries `viewStateShareKey=<key>`; chart
mode is `compareRunsMode=CHART`; `workflowType=machine_learning` opens "Model training" rather than
the GenAI overview (the UI picks that from the URL or the browser's last choice, not from the
`mlflow.experimentKind` tag, which is set anyway for other clients). A search term in the URL would
make the UI ignore the view, so the filter lives in the view.

One view per method: grouped curves of several methods would share a device-hours axis on which
each method's points interleave. On a metric x-axis the UI joins a group's points in x order
without averaging, so where seeds' device-hours differ the device-hours curve zig-zags; the
images-seen chart shows each init's mean with its min-max band.
"""
from __future__ import annotations

import json
import time
import urllib.parse

X_AXES = ("device_hours", "images_seen")
KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s address


def view_key(preset: str, method: str) -> str:
    return f"cmt-bench-{preset}-{method}"


def view_tag(preset: str, method: str) -> str:
    """The experiment tag MLflow's UI reads a saved view from."""
    return f"mlflow.sharedViewState.{view_key(preset, method)}"


def _line_chart(section: str, metric: str, x_metric: str) -> dict:
    """A line card as the UI serialises one (its RunsChartsLineCardConfig)."""
    return {"uuid": f"{metric}-vs-{x_metric}", "type": "LINE", "runsCountToCompare": 10, "metricSectionId": section,
            "deleted": False, "isGenerated": False, "displayName": f"{metric} vs {x_metric}",
            "metricKey": metric, "selectedMetricKeys": [metric], "lineSmoothness": 0,
            "xAxisScaleType": "linear", "scaleType": "log",
            "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None},
            "xAxisKey": "metric", "selectedXAxisMetricKey": x_metric, "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": False,
            "useGlobalLineSmoothing": False}


def view_state(metric: str, preset: str, method: str) -> dict:
    """The runs page's state: `method`'s post-training runs of `preset`, grouped by init, `metric`
    against each x-axis."""
    section = "post-training"
    return {
        "searchFilter": f"tags.stage = 'posttrain' and tags.preset = '{preset}' and tags.method = '{method}'",
        "compareRunCharts": [_line_chart(section, metric, x) for x in X_AXES],
        "compareRunSections": [{"uuid": section, "name": f"Post-training {method}: {metric} per init",
                                "display": True, "isReordered": False, "deleted": False, "isGenerated": False,
                                "columns": 2, "cardHeight": 400}],
        "isAccordionReordered": False,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "init"}]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL", "viewMaximized": False, "runListHidden": False,
        "globalLineChartConfig": {"xAxisKey": "metric", "lineSmoothness": 0, "selectedXAxisMetricKey": X_AXES[0]},
    }


def install(client, experiment_id: str, metric: str, preset: str, methods: list[str]) -> None:
    """Save one view per method in the experiment (a rerun overwrites them)."""
    client.set_experiment_tag(experiment_id, *KIND_TAG)
    now = int(time.time() * 1000)
    for method in methods:
        envelope = {"name": f"cmt_bench {preset}: post-training {method}", "createdAt": now, "updatedAt": now,
                    "state": json.dumps(view_state(metric, preset, method))}
        client.set_experiment_tag(experiment_id, view_tag(preset, method), json.dumps(envelope))


def url(base: str, experiment_id: str, preset: str, method: str) -> str:
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART",
                                    "viewStateShareKey": view_key(preset, method)})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
