"""Models in MLflow: every model a stage writes is an MLflow model that `mlflow.pyfunc` loads and that gives the
engine's logits; registration by name; one tag and param scheme on every stage run; a parent run named by recipe
and overrides that carries its stages' headline metrics; the store and its artifacts inside the run folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sgtm_engine.config import EvaluateSpec, TrainSpec, from_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.folders import local_artifact_root, local_tracking_uri, repoint_local_store
from sgtm_engine.mlflow_keys import run_tags
from sgtm_engine.model.hf import load_hf
from sgtm_engine.recipe import load_recipe
from sgtm_engine.runner import register_last_model, run_recipe
from tests.engine.tiny import TINY_SGTM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TINY_SGTM
RECIPE = {"name": "tiny", "stages": [
    {"name": "train", "kind": "train", "spec": TINY},
    {"name": "evaluate", "kind": "evaluate", "inputs": {"model": "train"},
     "spec": {"calibrate": {"steps": 3, "batch_size": 2}, "eval": {"max_batches": 1, "capability": False}}}]}
REGISTERED = "tiny-sgtm"


@pytest.fixture(scope="module")
def run(tmp_path_factory, engine_cache):
    """`sgtm run` of a train + calibrating evaluate recipe with --set train.steps=3 --register tiny-sgtm, from a
    working directory that is not the run folder."""
    root = tmp_path_factory.mktemp("mlflow-models")
    overrides = {"train.steps": 3}
    recipe = load_recipe(RECIPE, overrides)
    recipe = load_recipe(RECIPE, {**overrides, **register_last_model(recipe, REGISTERED)})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        out = run_recipe(recipe, root / "run", cache_dir=engine_cache, run_name="tiny train.steps=3")
    finally:
        os.chdir(cwd)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return root, out, client, {r.data.tags.get("sgtm.stage", "parent"): r for r in runs}


def test_pyfunc_loads_the_logged_model_and_gives_the_engines_logits(run):
    import mlflow

    root, out, client, runs = run
    uri = runs["train"].data.tags["sgtm.model.model"]
    mlflow.set_tracking_uri(out["mlflow_uri"])
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    ours = load_hf(out["stages"]["train"]["artifacts"]["model"]).eval()
    assert ours.lm_head.bias is not None and ours.lm_head.bias.abs().sum() > 0  # the bias must come through
    ids = torch.randint(0, ours.vocab_size, (2, TINY["model"]["context"]))
    logits = loaded.predict(ids.numpy().astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.asarray(logits)), ours(ids)[0], rtol=1e-5, atol=1e-5)


def test_the_calibrated_model_is_logged_and_registered_by_name(run):
    root, out, client, runs = run
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert len(versions) == 1 and versions[0].run_id == runs["evaluate"].info.run_id
    model_id = runs["evaluate"].data.tags["sgtm.model.calibrated_model"].removeprefix("models:/")
    assert model_id in versions[0].source  # the version is the evaluate run's logged (calibrated) model
    assert "sgtm.model.model" not in runs["evaluate"].data.tags  # its `model` is its parent's, logged there


def test_every_stage_run_carries_one_tag_and_param_scheme(run):
    root, out, client, runs = run
    train = out["stages"]["train"]
    for stage in ("train", "evaluate"):
        tags, params = runs[stage].data.tags, runs[stage].data.params
        expected = run_tags(kind=stage, stage=stage, method="sgtm", seed=0, recipe="tiny",
                            spec_hash=out["stages"][stage]["spec_hash"], code_version=train["code_version"])
        assert expected.items() <= tags.items(), stage
        assert params["spec.eval.max_batches"] == "1", stage  # evaluate runs log their spec too
    assert runs["train"].data.params["spec.steps"] == "3"


def test_the_parent_run_is_named_by_recipe_and_overrides_and_carries_headline_metrics(run):
    root, out, client, runs = run
    parent = runs["parent"]
    assert parent.info.run_name == "tiny train.steps=3" and parent.data.tags["sgtm.kind"] == "pipeline"
    metrics = parent.data.metrics
    calibrated = out["stages"]["evaluate"]["metrics"]["eval_calibrated/forget/loss"]
    assert metrics["evaluate/eval_calibrated/forget/loss"] == pytest.approx(calibrated)
    assert "train/eval/retain/loss" in metrics
    assert not any(key.count("/") > 3 for key in metrics)  # split-level only, no per-category keys


def test_the_store_and_its_artifacts_stay_in_the_run_folder(run):
    root, out, client, runs = run
    assert not (root / "mlruns").exists()
    artifacts = root / "run" / "mlartifacts"
    assert list(artifacts.rglob("MLmodel")) and list(artifacts.rglob("result.json"))


def test_register_is_a_checked_spec_field_and_needs_a_model():
    with pytest.raises(ConfigError, match=r"register.*'no/slashes'.*registered model name"):
        from_dict(TrainSpec, {**TINY, "register": "no/slashes"})
    with pytest.raises(ConfigError, match=r"register.*only a calibrating evaluation"):
        from_dict(EvaluateSpec, {"ablate": None, "register": "x"})
    only_train = load_recipe({"name": "t", "stages": RECIPE["stages"][:1]})
    assert register_last_model(only_train, "m") == {"train.register": "m"}


def test_a_rerun_keeps_finished_stages_and_reopens_its_parent_run(tmp_path, engine_cache):
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(RECIPE, {"train.steps": 3})
    first = run_recipe(recipe, tmp_path / "run", cache_dir=engine_cache)
    (tmp_path / "run" / "evaluate" / "result.json").unlink()  # as if the evaluate stage had been cut off
    seen: dict[str, list[str]] = {}
    again = run_recipe(recipe, tmp_path / "run", cache_dir=engine_cache,
                       events=lambda name: lambda event: seen.setdefault(name, []).append(event["type"]))
    assert seen["train"] == ["kept"] and seen["evaluate"][0] == "started" and seen["evaluate"][-1] == "finished"
    assert again["stages"]["train"]["metrics"] == first["stages"]["train"]["metrics"]
    assert again["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    client = MlflowClient(again["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    # the finished train stage ran (and was logged) once; the cut-off evaluate ran again, under the same parent
    assert sorted(r.data.tags["sgtm.stage"] for r in runs if "sgtm.stage" in r.data.tags) == [
        "evaluate", "evaluate", "train"]
    parents = [r for r in runs if r.data.tags.get("sgtm.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs if r is not parents[0])
    # another evaluate spec: --overwrite starts that stage over and still keeps the train stage
    changed = load_recipe(RECIPE, {"train.steps": 3, "evaluate.calibrate.steps": 2})
    seen.clear()
    run_recipe(changed, tmp_path / "run", cache_dir=engine_cache, overwrite=True,
               events=lambda name: lambda event: seen.setdefault(name, []).append(event["type"]))
    assert seen["train"] == ["kept"] and seen["evaluate"][-1] == "finished"
    # the parent run deleted in MLflow's UI: the next rerun opens a new one rather than logging into the bin
    deleted = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert run_recipe(changed, tmp_path / "run", cache_dir=engine_cache)["mlflow_parent_run_id"] == deleted
    client.delete_run(deleted)
    third = run_recipe(changed, tmp_path / "run", cache_dir=engine_cache)
    assert third["mlflow_parent_run_id"] != deleted
    assert client.get_run(third["mlflow_parent_run_id"]).info.status == "FINISHED"


def _locations(client, experiment: str, registered: str) -> list[str]:
    """Every artifact location the store records for an experiment: its own, its runs', its logged models' and its
    registered model versions'."""
    exp = client.get_experiment_by_name(experiment)
    return [exp.artifact_location, *(r.info.artifact_uri for r in client.search_runs([exp.experiment_id])),
            *(m.artifact_location for m in client.search_logged_models([exp.experiment_id])),
            *(v.source for v in client.search_model_versions(f"name='{registered}'"))]


def test_a_moved_run_folder_resumes_into_its_own_mlflow_store(tmp_path, engine_cache):
    """MLflow records absolute artifact locations: a run folder moved elsewhere and resumed there logs into its own
    artifacts (not back at the old place), reopens its parent run, and its earlier models load from here."""
    import mlflow
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(RECIPE, {"train.steps": 3})
    recipe = load_recipe(RECIPE, {"train.steps": 3, **register_last_model(recipe, "moved")})
    first = run_recipe(recipe, tmp_path / "a" / "run", cache_dir=engine_cache)
    (tmp_path / "b").mkdir()
    moved = (tmp_path / "a" / "run").rename(tmp_path / "b" / "run")
    (moved / "evaluate" / "result.json").unlink()  # the evaluate stage cut off: the rerun logs a run and a model
    again = run_recipe(recipe, moved, cache_dir=engine_cache)
    assert not (tmp_path / "a" / "run").exists()  # nothing was written back at the old place
    assert again["mlflow_uri"] == local_tracking_uri(moved)
    assert again["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    client = MlflowClient(again["mlflow_uri"])
    locations = _locations(client, "tiny", "moved")
    assert len(locations) >= 1 + 3 + 2 + 2  # experiment, parent + two stage runs (+ the rerun), models, versions
    assert all(loc.startswith(local_artifact_root(moved).as_uri() + "/") for loc in locations), locations
    assert repoint_local_store(moved) is None  # done once; the store now points here
    mlflow.set_tracking_uri(again["mlflow_uri"])
    try:  # version 1 was logged and registered at the old place
        loaded = mlflow.pyfunc.load_model("models:/moved/1")
    finally:
        mlflow.set_tracking_uri(None)
    assert loaded.predict(np.zeros((1, 4), dtype=np.int64)).shape[:2] == (1, 4)


@pytest.mark.slow
def test_sgtm_ui_serves_a_copied_folders_own_artifacts(run, tmp_path):
    """`sgtm ui` on a copy of a run folder: MLflow's UI server hands out the copy's artifacts, not the original's."""
    import shutil
    import subprocess
    import sys

    import httpx

    from tests.integration.compose import ServiceProcess, free_port, wait_until

    root, out, client, runs = run
    copy = shutil.copytree(root / "run", tmp_path / "copy")
    run_id = runs["train"].info.run_id
    served = next(copy.joinpath("mlartifacts").rglob(f"{run_id}/artifacts/result.json"))
    served.write_text('{"copy": true}')
    no_store = subprocess.run([sys.executable, "-m", "sgtm_engine.cli", "ui", str(tmp_path)], capture_output=True,
                              text=True, check=False)
    assert no_store.returncode == 2 and f"FOLDER={tmp_path}: holds no MLflow store" in no_store.stderr
    stage = subprocess.run([sys.executable, "-m", "sgtm_engine.cli", "ui", str(copy / "train")], capture_output=True,
                           text=True, check=False)
    assert stage.returncode == 2 and f"did you mean {copy}, the run folder it is in?" in stage.stderr
    port = free_port()
    ui = ServiceProcess("sgtm-ui", [sys.executable, "-m", "sgtm_engine.cli", "ui", str(copy), "--port", str(port)],
                        {}, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/health").status_code == 200, 60, "sgtm ui", ui.log_tail)
        got = httpx.get(f"{base}/get-artifact", params={"path": "result.json", "run_uuid": run_id})
        assert got.status_code == 200 and got.json() == {"copy": True}
    finally:
        ui.stop()
    assert f"was at {(root / 'run').resolve()}" in ui.log_tail()
    passed = subprocess.run([sys.executable, "-m", "sgtm_engine.cli", "ui", str(copy), "--no-such-option"],
                            capture_output=True, text=True, check=False, timeout=60)  # passed on: mlflow refuses it
    assert passed.returncode == 2 and "mlflow ui" in passed.stderr and "'--no-such-option'" in passed.stderr
