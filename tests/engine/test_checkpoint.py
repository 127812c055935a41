"""Checkpoint folders: what a killed writer leaves half-written is removed when the next stage starts."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sgtm_engine.checkpoint import FORMAT_VERSION, latest_checkpoint


def _partial(ckpts: Path, step: int) -> Path:
    tmp = ckpts / f".tmp-step-{step:07d}-4242"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"\0" * 4096)  # a writer killed mid-save
    return tmp


def test_partial_checkpoints_are_removed_and_the_complete_one_is_kept(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    complete = ckpts / "step-0000003"
    complete.mkdir(parents=True)
    torch.save({"format_version": FORMAT_VERSION, "step": 3}, complete / "state.pt")
    (ckpts / "latest").write_text(complete.name)
    partial = _partial(ckpts, 5)
    (ckpts / ".latest.tmp").write_text("step-0000005")
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.step == 3 and found.path == complete
    assert not partial.exists() and not (ckpts / ".latest.tmp").exists()


def test_a_workdir_with_only_a_partial_checkpoint_starts_fresh_and_clean(tmp_path: Path) -> None:
    partial = _partial(tmp_path / "checkpoints", 1)
    assert latest_checkpoint(tmp_path) is None
    assert not partial.exists()


def _write_many(path: str, n: int) -> None:
    from sgtm_engine.folders import write_json

    for i in range(n):
        write_json(Path(path), {"writer": os.getpid(), "i": i})


def test_records_written_by_two_processes_at_once_stay_whole(tmp_path):
    """torchrun's ranks record the same error.json together: neither may rename the other's temporary file away."""
    import json
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(tmp_path / "error.json"), 300)) for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert json.loads((tmp_path / "error.json").read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]
