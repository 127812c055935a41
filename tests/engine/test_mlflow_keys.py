"""One `metric_key`: free-text category names become keys MLflow stores, the same from the tracker and from the sweep
report (a sweep's aggregates must line up with its runs' metrics)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, _validate_metric_name, _validate_param_name

from sgtm_engine.folders import local_tracking_uri
from sgtm_engine.mlflow_keys import metric_key
from sgtm_engine.report import sweep_metrics
from sgtm_engine.tracking import MlflowTracker

CATEGORIES = ["Geografía, historia", "数学", "历史", "Ciencias naturales", "Arte/Música", "Ñandú (Æsir)", "a//b",
              "..", "한국어", "tab\there", "ﬁlm", "x" * 300]


def _report_keys(metrics: list[str]) -> set[str]:
    """The keys `report.sweep_metrics` gives these metrics' means in a sweep row of variant `v`."""
    row = {"variant": "v", "params": {}, "n_succeeded": 1, "stats": {m: {"mean": 1.0, "std": None} for m in metrics}}
    report = {"n_cells": 1, "n_succeeded": 1, "n_failed": 0, "tables": [{"rows": [row]}]}
    return {k for k in sweep_metrics(report) if not k.startswith("sweep/") and k != "v/n_succeeded"}


@pytest.mark.parametrize("name", CATEGORIES)
def test_key_is_valid_for_mlflow(name):
    key = metric_key(f"eval/{name}/loss")
    assert key.isascii() and len(key) <= MAX_ENTITY_KEY_LENGTH, key
    _validate_metric_name(key)
    _validate_param_name(key)
    assert metric_key(key) == key  # a valid key is left alone


def test_known_foldings():
    assert metric_key("eval/Geografía, historia/loss") == "eval/Geografia_ historia/loss"
    assert metric_key("eval/数学/loss") == "eval/u6570u5b66/loss"
    assert metric_key("train/loss") == "train/loss"


def test_distinct_names_get_distinct_keys():
    keys = {metric_key(f"eval/{name}/loss") for name in CATEGORIES}
    assert len(keys) == len(CATEGORIES)


def test_tracker_and_report_log_one_key_per_name(tmp_path):
    names = [f"eval/{name}/loss" for name in CATEGORIES]
    uri = local_tracking_uri(tmp_path)
    tracker = MlflowTracker(uri, experiment="keys", run_name="keys")
    tracker.log_metrics({f"v/{name}/mean": 1.0 for name in names}, step=0)  # the row's metric, as a run would log it
    tracker.close()
    assert tracker.failed_calls == 0
    stored = set(MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics)
    assert len(stored) == len(names)
    assert stored == _report_keys(names)
