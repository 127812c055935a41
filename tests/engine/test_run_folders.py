"""Run folders a researcher can trust and hand on: a folder resumes only the run it holds, and it can be moved.

- A stage pointed at a folder holding a run of another spec (model, masking, data, seed, steps, or another stage
  kind) is refused with the differing field named; `overwrite` starts over; the same spec resumes, bit-identically.
- Every path a run records is relative to its own folder: a run folder moved elsewhere is still read, evaluated and
  exported, from any working directory.
- One process at a time runs in a folder: a second `sgtm run`, sweep or stage on a folder in use is refused before
  it touches anything, and the hold ends with its process, however that ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sgtm_engine.errors import ConfigError, FolderInUse
from sgtm_engine.export import export_model
from sgtm_engine.folders import LOCK_FILE, hold_folder
from sgtm_engine.stage import read_result, run_stage
from tests.engine.tiny import TINY_SGTM

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {**TINY_SGTM, "checkpoint_every": 2}


def _weights(record: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(record["artifacts"]["model"]) / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, engine_cache) -> Path:
    workdir = tmp_path_factory.mktemp("runs") / "train"
    run_stage("train", TINY, workdir, cache_dir=engine_cache)
    return workdir


@pytest.mark.parametrize(("change", "field"), [
    ({"model": {**TINY["model"], "d_model": 32}}, "model.d_model"),
    ({"masking": {**TINY["masking"], "strategy": "gradient_routing"}}, "masking.strategy"),
    ({"data": {**TINY["data"], "corpus": "wiki-bio"}}, "data.corpus"),
    ({"seed": 1}, "seed"),
    ({"steps": 6}, "steps"),
])
def test_a_folder_holding_another_spec_is_refused_with_the_field_named(trained, tmp_path, engine_cache, change,
                                                                      field):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    before = (copy / "result.json").read_text()
    with pytest.raises(ConfigError, match=rf"{field}: .* -> .*overwrite"):
        run_stage("train", {**TINY, **change}, copy, cache_dir=engine_cache)
    assert (copy / "result.json").read_text() == before  # nothing of the old run was touched


def test_another_stage_kind_is_refused_too(trained, tmp_path, engine_cache):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    with pytest.raises(ConfigError, match=r"kind: 'train' -> 'ablate'"):
        run_stage("ablate", {}, copy, inputs={"model": trained}, cache_dir=engine_cache)


def test_runtime_settings_do_not_define_the_run_and_the_same_spec_resumes_bit_identically(trained, tmp_path,
                                                                                          engine_cache):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    again = run_stage("train", {**TINY, "runtime": {"threads": 1}}, copy, cache_dir=engine_cache)
    assert again["summary"]["steps"] == TINY["steps"]
    original, resumed = _weights(read_result(trained)), _weights(again)
    assert original.keys() == resumed.keys()
    assert all(torch.equal(original[k], resumed[k]) for k in original)


def test_overwrite_starts_over(trained, tmp_path, engine_cache):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    (copy / "stray.txt").write_text("left by the old run")
    record = run_stage("train", {**TINY, "seed": 1}, copy, cache_dir=engine_cache, overwrite=True)
    assert record["seed"] == 1 and not (copy / "stray.txt").exists()
    assert json.loads((copy / "stage.json").read_text())["spec"]["seed"] == 1


def test_a_folder_in_use_is_refused_and_free_again_once_its_holder_is_gone(trained, tmp_path, engine_cache):
    """Another process runs in the folder (here: a child holding it, then killed with SIGKILL, which leaves no chance
    to clean up): a stage, a recipe or a sweep asked to run there is refused, naming the holder, and writes nothing;
    once the holder is gone the same call runs."""
    from sgtm_engine.local_sweep import load_sweep, run_sweep
    from sgtm_engine.recipe import load_recipe
    from sgtm_engine.runner import run_recipe

    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    def files() -> dict[str, bytes]:  # the lock file says who holds the folder
        return {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != LOCK_FILE}

    before = files()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sgtm_engine.folders import hold_folder"
         "\nwith hold_folder(Path(sys.argv[1]), 'a test'):\n print('held', flush=True); time.sleep(600)", str(copy)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for run in (lambda: run_stage("train", TINY, copy, cache_dir=engine_cache, overwrite=True),
                    lambda: run_recipe(load_recipe("wiki-bio-sgtm"), copy),
                    lambda: run_sweep(load_sweep("demo"), copy)):
            with pytest.raises(FolderInUse, match=rf"{copy} is in use by a test \(pid {holder.pid}\)"):
                run()
        assert files() == before  # not touched
    finally:
        holder.kill()
        holder.wait()
    assert run_stage("train", TINY, copy, cache_dir=engine_cache)["metrics"] == read_result(trained)["metrics"]


def test_a_folder_is_held_while_its_stage_runs_and_overwrite_keeps_the_hold(trained, tmp_path, engine_cache,
                                                                          monkeypatch):
    """Two holds of one folder exclude each other even within a process; `overwrite` empties the folder around its
    lock file, so the stage keeps the folder it holds."""
    import sgtm_engine.stage as stage

    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    train, seen = stage.STAGE_RUNNERS[stage.StageKind.TRAIN], []

    def train_while_checking(*args, **kwargs):
        seen.append((copy / LOCK_FILE).exists())
        with pytest.raises(FolderInUse), hold_folder(copy, "a second process"):
            pass
        return train(*args, **kwargs)

    monkeypatch.setitem(stage.STAGE_RUNNERS, stage.StageKind.TRAIN, train_while_checking)
    record = run_stage("train", {**TINY, "seed": 1}, copy, cache_dir=engine_cache, overwrite=True)
    assert seen == [True] and record["seed"] == 1
    with hold_folder(copy, "the next process"):  # released when the stage ended
        pass


def test_overwrite_leaves_a_run_of_the_same_spec_to_resume(trained, tmp_path, engine_cache):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    (copy / "stray.txt").write_text("left by the same run")
    record = run_stage("train", TINY, copy, cache_dir=engine_cache, overwrite=True)
    assert (copy / "stray.txt").exists() and record["metrics"] == read_result(trained)["metrics"]


def test_a_folder_with_a_run_but_no_stage_record_is_refused(trained, tmp_path, engine_cache):
    copy = tmp_path / "train"
    shutil.copytree(trained, copy)
    (copy / "stage.json").unlink()
    with pytest.raises(ConfigError, match="spec is unknown"):
        run_stage("train", TINY, copy, cache_dir=engine_cache)


def test_a_moved_run_folder_is_read_evaluated_and_exported_from_another_directory(trained, tmp_path, engine_cache,
                                                                                 monkeypatch):
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(trained.parent, moved)
    shutil.rmtree(trained.parent / "evaluate", ignore_errors=True)
    stored = json.loads((moved / "train" / "result.json").read_text())
    assert not Path(stored["artifacts"]["model"]).is_absolute()
    assert not Path(stored["checkpoint"]["path"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # neither the old nor the new folder's parent
    record = read_result(moved / "train")
    assert Path(record["artifacts"]["model"]).is_relative_to(moved.resolve())
    evaluated = run_stage("evaluate", {"ablate": None, "eval": {"max_batches": 1, "capability": False}},
                          moved / "evaluate", inputs={"model": moved / "train"}, cache_dir=engine_cache)
    assert "eval/forget/loss" in evaluated["metrics"]
    out = export_model((moved / "train").resolve(), tmp_path / "exported")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_sgtm_run_without_a_workdir_gets_a_fresh_readable_folder_per_run():
    from sgtm_engine.cli import fresh_run_folder
    from sgtm_engine.recipe import load_recipe

    recipe = load_recipe("wiki-bilingual-sgtm")
    other = load_recipe("wiki-bilingual-sgtm", {"train.steps": 7})
    folder = fresh_run_folder(recipe)
    assert folder.parent.name == "runs" and folder.name.startswith("wiki-bilingual-sgtm-")
    assert folder.name.split("-")[-1] != fresh_run_folder(other).name.split("-")[-1]  # the spec hash tells them apart


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_workdir_that_cannot_be_a_folder_is_refused_with_the_field_named(tmp_path, where):
    """`--workdir` naming a file (or a path under one) is a config error naming it, for a stage, a recipe and a
    sweep alike, before anything runs (it was a NotADirectoryError traceback)."""
    from sgtm_engine.local_sweep import load_sweep, run_sweep
    from sgtm_engine.recipe import load_recipe
    from sgtm_engine.runner import run_recipe

    (tmp_path / "afile").write_text("notes\n")
    workdir = tmp_path / "afile" if where == "a file" else tmp_path / "afile" / "sub"
    why = "a file, not a folder; name a folder" if where == "a file" else "cannot create the folder"
    for run in (lambda: run_stage("train", TINY_SGTM, workdir),
                lambda: run_recipe(load_recipe("wiki-bio-sgtm"), workdir),
                lambda: run_sweep(load_sweep("demo"), workdir)):
        with pytest.raises(ConfigError, match=f"workdir='{workdir}': {why}"):
            run()
    assert (tmp_path / "afile").read_text() == "notes\n"


def test_a_misspelt_stage_kind_gets_a_did_you_mean_and_no_folder(tmp_path):
    """`run_stage("trian", ...)` from a notebook (or `run-stage --kind trian`) words it as a recipe's kind is worded
    (it was a bare ValueError from the enum)."""
    with pytest.raises(ConfigError, match=r"kind='trian': must be one of \[.*\]; did you mean 'train'\?"):
        run_stage("trian", {}, tmp_path / "w")
    assert not (tmp_path / "w").exists()
