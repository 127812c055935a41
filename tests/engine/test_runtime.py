"""Where a stage runs: the torchrun process group a stage joins is left when the stage ends, with or without an
error, and a group the caller set up stays the caller's (two real gloo ranks, as torchrun starts them: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the memory allocator a run records is the one it ran on."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sgtm_engine.config import Device, RuntimeSpec
from sgtm_engine.runtime import allocator, stage_runtime
from tests.integration.compose import free_port

CPU_SPEC = RuntimeSpec(device=Device.CPU, threads=1)


def _as_torchrun_rank(rank: int, world: int, ports: list[int], out: Path) -> None:
    """Three stages in a row on one rank: one that succeeds, one that raises, one inside the caller's own group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    seen: dict[str, object] = {}
    os.environ["MASTER_PORT"] = str(ports[0])
    with stage_runtime(CPU_SPEC) as runtime:
        seen["joined"] = dist.is_initialized()
        seen["total"] = runtime.total([[float(rank + 1)]])
    seen["left_after_success"] = not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])
    try:
        with stage_runtime(CPU_SPEC):
            raise ValueError("the stage failed")
    except ValueError:
        seen["left_after_error"] = not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[2])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with stage_runtime(CPU_SPEC) as runtime:
        seen["callers_total"] = runtime.total([[1.0]])
    seen["callers_group_kept"] = dist.is_initialized()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


def test_a_stage_leaves_the_process_group_it_joined(tmp_path):
    torch.multiprocessing.spawn(_as_torchrun_rank, args=(2, [free_port() for _ in range(3)], tmp_path), nprocs=2)
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"joined": True, "total": [[3.0]], "left_after_success": True, "left_after_error": True,
                        "callers_total": [[2.0]], "callers_group_kept": True}


def test_one_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with stage_runtime(CPU_SPEC) as runtime:
        assert not runtime.distributed and not dist.is_initialized()


def _allocator_under(preload: str) -> str:
    env = {**os.environ, "LD_PRELOAD": preload}
    code = "from sgtm_engine.runtime import allocator; print(allocator())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_allocator_recorded_is_the_one_loaded():
    assert allocator() == "system" or os.environ.get("LD_PRELOAD")  # this process: the C library's malloc
    assert _allocator_under("") == "system"
    jemalloc = ctypes.util.find_library("jemalloc")
    if jemalloc is None:
        pytest.skip("no jemalloc on this machine to preload")
    assert _allocator_under(jemalloc) == "jemalloc"
