"""One `code_version` for one run: the engine's `result.json` and the supervisor's MLflow tag carry the same string."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import sessionmaker

from api.config import Settings
from sgtm_engine.provenance import MAX_LENGTH, code_version
from sgtm_engine.runtime import _peak_rss_bytes
from sgtm_engine.stage import run_stage
from sgtm_engine.tracking import NullTracker
from tests.ledger_fixtures import RecordingEnqueuer
from workers.run_store import NullRunStore
from workers.supervisor import Supervisor

TINY = {  # the data of tests/engine/test_attack.py: in one session both share the prepared corpus in `engine_cache`
    "model": {"n_layer": 1, "d_model": 32, "context": 32},
    "masking": {"forget_mlp_dim": 16, "forget_attn_heads": 2},
    "data": {"corpus": "wiki-bilingual", "vocab_size": 512, "max_docs_per_split": 40, "test_docs_per_category": 2},
    "steps": 1, "batch_size": 2, "micro_batch_size": 2, "log_every": 1,
    "eval": {"max_batches": 1, "capability": False},
}


def _supervisor_tag(tmp_path: Path) -> str:
    """The value the supervisor stamps on the job's MLflow run (`open_job_run(code_version=...)`)."""
    supervisor = Supervisor(settings=Settings(data_root=tmp_path), factory=sessionmaker(), enqueuer=RecordingEnqueuer(),
                            run_store=NullRunStore())
    return supervisor.code_version


@pytest.mark.parametrize("image_version", [None, "0123abcd-built-image"])
def test_result_json_and_mlflow_tag_carry_one_code_version(tmp_path, engine_cache, monkeypatch, image_version):
    if image_version is None:
        monkeypatch.delenv("SGTM_CODE_VERSION", raising=False)
    else:
        monkeypatch.setenv("SGTM_CODE_VERSION", image_version)
    result = run_stage("train", TINY, tmp_path / "train", cache_dir=engine_cache)
    tag = _supervisor_tag(tmp_path)
    assert result["code_version"] == tag
    assert (image_version is None) or tag == image_version


def test_code_version_format(monkeypatch):
    monkeypatch.delenv("SGTM_CODE_VERSION", raising=False)
    version = code_version()
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty-[0-9a-f]{12})?", version), version
    else:
        assert version.startswith("sgtm-") or version == "unknown", version
    monkeypatch.setenv("SGTM_CODE_VERSION", "x" * 100)
    assert code_version() == "x" * MAX_LENGTH  # the ledger's column is 64 characters


def test_a_stage_records_the_code_version_it_started_with(tmp_path, engine_cache, monkeypatch):
    """A checkout that changes while an in-process stage runs (a commit, a branch switch) does not relabel the stage:
    it records the version it started with, the one its modules were imported from."""
    import sgtm_engine.stage as stage

    current = {"version": "before"}
    monkeypatch.setattr(stage, "code_version", lambda: current["version"])
    train = stage.STAGE_RUNNERS[stage.StageKind.TRAIN]

    def train_then_commit(*args, **kwargs):
        record = train(*args, **kwargs)
        current["version"] = "after"
        return record

    monkeypatch.setitem(stage.STAGE_RUNNERS, stage.StageKind.TRAIN, train_then_commit)
    result = run_stage("train", TINY, tmp_path / "train", cache_dir=engine_cache)
    assert result["code_version"] == "before"
    assert '"code_version": "before"' in (tmp_path / "train" / "resolved_spec.json").read_text()


def test_a_stage_run_s_mlflow_tag_is_its_record_s_code_version(tmp_path, engine_cache, monkeypatch):
    """`sgtm run` tags a stage's MLflow run as it opens it, and again from the stage's record when it ends: the two
    records of one run agree even when the checkout changed in between."""
    from mlflow.tracking import MlflowClient

    import sgtm_engine.runner as runner
    import sgtm_engine.stage as stage
    from sgtm_engine.recipe import load_recipe

    monkeypatch.setattr(runner, "code_version", lambda: "at-open")
    monkeypatch.setattr(stage, "code_version", lambda: "recorded")
    out = runner.run_recipe(load_recipe({"name": "p", "stages": [{"name": "train", "kind": "train", "spec": TINY}]}),
                            tmp_path / "run", cache_dir=engine_cache)
    client = MlflowClient(out["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    train = next(r for r in runs if r.data.tags.get("sgtm.stage") == "train")
    assert out["stages"]["train"]["code_version"] == train.data.tags["sgtm.code_version"] == "recorded"


class _Metrics(NullTracker):
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.update(metrics)


def test_a_stage_records_what_it_used_and_not_what_the_process_used_before(tmp_path, engine_cache):
    """`resources` in result.json (and as MLflow metrics): the stage's CPU time and its own peak resident memory;
    memory the process held and gave back before the stage started is not the stage's peak."""
    big = np.ones(2**31 // 8)  # 2 GiB, written, then returned to the system
    del big
    before = _peak_rss_bytes()
    tracker = _Metrics()
    used = run_stage("train", TINY, tmp_path / "train", cache_dir=engine_cache, tracker=tracker)["resources"]
    assert used["cpu_user_s"] > 0 and used["cpu_system_s"] >= 0 and used["peak_rss_gb"] > 0
    if sys.platform == "linux":
        assert used["peak_rss_since"] == "stage"
        assert used["peak_rss_gb"] * 2**30 < before - 2**30
    assert "cuda_peak_allocated_gb" not in used  # a CPU stage
    assert tracker.logged["resources/peak_rss_gb"] == used["peak_rss_gb"]


def test_uncommitted_engine_code_makes_the_version_dirty(tmp_path, monkeypatch):
    """An edited engine file and a new, untracked one both mark the version dirty, each with its own hash; a file git
    ignores (bytecode) and a change outside the engine (docs) do not."""
    import subprocess

    import sgtm_engine.provenance as provenance

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    (tmp_path / "sgtm_engine").mkdir()
    (tmp_path / "sgtm_engine" / "model.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("*.pyc\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    sha = git("rev-parse", "HEAD")
    monkeypatch.setattr(provenance, "_ROOT", tmp_path)
    monkeypatch.delenv("SGTM_CODE_VERSION", raising=False)

    (tmp_path / "sgtm_engine" / "model.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "README.md").write_text("edited\n")
    assert code_version() == sha
    (tmp_path / "sgtm_engine" / "corpus.py").write_text("y = 2\n")
    untracked = code_version()
    assert re.fullmatch(sha + r"-dirty-[0-9a-f]{12}", untracked)
    (tmp_path / "sgtm_engine" / "corpus.py").write_text("y = 3\n")
    assert code_version() not in (untracked, sha)  # the new file's content counts, not only its name
    (tmp_path / "sgtm_engine" / "corpus.py").unlink()
    (tmp_path / "sgtm_engine" / "model.py").write_text("x = 2\n")
    assert re.fullmatch(sha + r"-dirty-[0-9a-f]{12}", code_version()) and code_version() != untracked
