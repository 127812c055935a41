"""Where a stage runs: the torchrun process group a stage joins is left when the stage ends, with or without an
error, and a group the caller set up stays the caller's (two real gloo ranks, as torchrun starts them: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the memory allocator a run records is the one it ran on;
`runtime.compile` reaches the training step and the record, and is refused where torch could not compile."""

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
from sgtm_engine.errors import ConfigError
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


def test_compile_wraps_the_training_net_and_is_recorded():
    model = torch.nn.Linear(2, 2)
    with stage_runtime(RuntimeSpec(device=Device.CPU, compile=True)) as runtime:
        net = runtime.training_net(model)  # compiled lazily, at its first call
        assert net is not model and net._orig_mod is model and runtime.describe()["compile"] is True
    with stage_runtime(CPU_SPEC) as runtime:
        assert runtime.training_net(model) is model and runtime.describe()["compile"] is False


def test_compile_without_a_host_compiler_is_refused_before_the_stage_runs(monkeypatch, tmp_path):
    """torch.compile builds CPU kernels with a C++ compiler; with none, the stage stops at once naming the field,
    not at its first step with a traceback from inside torch."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError) as e, stage_runtime(RuntimeSpec(device=Device.CPU, compile=True)):
        pass
    (problem,) = e.value.problems
    assert problem.loc == ("runtime", "compile") and "CXX unset, no g++ or clang++" in problem.msg
    monkeypatch.setenv("CXX", "my-g++")
    with pytest.raises(ConfigError, match="CXX='my-g\\+\\+' is not on PATH"), \
            stage_runtime(RuntimeSpec(device=Device.CPU, compile=True)):
        pass
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    monkeypatch.delenv("CXX")
    with stage_runtime(RuntimeSpec(device=Device.CPU, compile=True)) as runtime:  # one on PATH: it goes ahead
        assert runtime.compile
