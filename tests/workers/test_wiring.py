"""Celery settings, the engine command line, and parity with the engine's MLflow param rendering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from api.config import Settings
from sgtm_engine.config import TrainSpec, flat_params, to_dict
from sgtm_engine.mlflow_keys import spec_params
from workers.child import build_argv


def test_celery_is_configured_for_long_supervised_jobs(tmp_path: Path) -> None:
    code = ("from workers.celery_app import app; c = app.conf; import json; print(json.dumps({"
            "'acks_late': c.task_acks_late, 'reject': c.task_reject_on_worker_lost, "
            "'prefetch': c.worker_prefetch_multiplier, 'per_child': c.worker_max_tasks_per_child, "
            "'vt': c.broker_transport_options['visibility_timeout'], 'queues': [q.name for q in c.task_queues], "
            "'beat': list(c.beat_schedule), 'routes': c.task_routes}))")
    env = {"PATH": "/usr/bin:/bin", "SGTM_QUEUE_PREFIX": "x-", "SGTM_WORKER_QUEUES": "gpu",
           "SGTM_DATA_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    import json

    conf = json.loads(out.stdout)
    assert conf["acks_late"] and conf["reject"] and conf["prefetch"] == 1 and conf["per_child"] > 1
    assert conf["vt"] >= 24 * 3600  # above the longest job
    assert conf["queues"] == ["x-gpu"] and conf["beat"] == ["reap-stale-jobs"]
    assert conf["routes"]["sgtm.reap"]["queue"] == "x-control"


def test_engine_argv_single_process_and_torchrun(tmp_path: Path) -> None:
    s = Settings(_env_file=None, engine_command=["py", "-m", "sgtm_engine"], engine_cache_dir=tmp_path / "c")
    argv = build_argv(s, kind="ablate", spec_path=tmp_path / "spec.json", workdir=tmp_path, gpus=1,
                      inputs={"model": tmp_path / "parent"}, mlflow_uri="http://m:5000", mlflow_run_id="r1")
    assert argv == ["py", "-m", "sgtm_engine", "run-stage", "--kind", "ablate", "--spec", str(tmp_path / "spec.json"),
                    "--workdir", str(tmp_path), "--stdin-lifeline", str(s.cancel_grace_s),
                    "--input", f"model={tmp_path / 'parent'}", "--mlflow-uri", "http://m:5000", "--mlflow-run-id", "r1",
                    "--cache-dir", str(tmp_path / "c")]
    ddp = build_argv(s, kind="train", spec_path=tmp_path / "s", workdir=tmp_path, inputs={}, mlflow_uri=None,
                     mlflow_run_id=None, gpus=4)
    assert ddp[:5] == [*s.torchrun_command, "--standalone", "--nproc_per_node=4"][:5]
    assert ddp[ddp.index("-m", 3):ddp.index("-m", 3) + 3] == ["-m", "sgtm_engine", "run-stage"]


def test_params_render_exactly_as_the_engine_logs_them() -> None:
    """The supervisor logs a job's spec as params (`spec_params`) and the train stage logs it again through its
    tracker (`log_params({"spec": ...})`); MLflow accepts the second write only if it is identical."""
    spec = to_dict(TrainSpec())
    assert spec_params(spec) == flat_params({"spec": spec})


def test_an_embedded_data_root_that_moved_keeps_its_mlflow_artifacts(tmp_path: Path) -> None:
    """The embedded service keeps its MLflow store in its data root. Moved, the worker points the store at the
    artifacts there again: runs logged before the move show their artifacts, and new ones are not written back at
    the old place."""
    from mlflow.tracking import MlflowClient

    from sgtm_engine.folders import local_artifact_root, local_tracking_uri
    from workers.context import build_worker_context
    from workers.run_store import make_run_store

    old, new, files = tmp_path / "old", tmp_path / "new", tmp_path / "files"
    old.mkdir()
    files.mkdir()
    (files / "note.txt").write_text("logged before the move")
    before = make_run_store(local_tracking_uri(old), artifact_root=local_artifact_root(old))
    run_id = before.create_run(before.experiment_id("exp"), name="before", tags={})
    before.log_artifacts(run_id, files, "files")
    old.rename(new)
    context = build_worker_context(Settings(_env_file=None, mode="embedded", data_root=new, tracking=True))
    after = context.run_store.create_run(context.run_store.experiment_id("exp"), name="after", tags={})
    context.run_store.log_artifacts(after, files, "files")
    client = MlflowClient(local_tracking_uri(new))
    assert client.get_run(run_id).info.artifact_uri.startswith(local_artifact_root(new).as_uri() + "/")
    fetched = client.download_artifacts(run_id, "files/note.txt", str(tmp_path))
    assert Path(fetched).read_text() == "logged before the move"
    assert not old.exists()  # the run logged after the move wrote here, not at the old place
