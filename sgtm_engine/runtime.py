"""Where a stage runs: device, precision, torchrun DDP, the stop flag and rank-0 logging.

Reads only torchrun's RANK, LOCAL_RANK and WORLD_SIZE from the environment (the one other variable the engine reads
is the image's SGTM_CODE_VERSION, in provenance.py). Randomness is never global: callers build
`torch.Generator`/`random.Random` objects from config seeds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sgtm_engine.config import Device, Precision, RuntimeSpec
from sgtm_engine.errors import ConfigError, Problem
from sgtm_engine.provenance import library_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Precision  # resolved: fp32 or bf16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    compile: bool = False  # torch.compile the training step (`training_net`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> dict[str, Any]:
        """What this run ran on, for result.json and MLflow: device (the CPU's or GPU's model), dtype, attention
        backend, CPU vector instructions, Python and library versions, memory allocator, threads and ranks."""
        attention = "sdpa"  # the model's only attention path (model/gpt_neo.py)
        if self.device.type == "cuda":
            enabled = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                             ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                             ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                             ("math", torch.backends.cuda.math_sdp_enabled())) if on]
            attention += f"[{','.join(enabled)}]"
        return {
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name(),
            # the vector instructions torch's CPU kernels use (AVX512, AVX2, ...): CPU results round differently
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "dtype": "bfloat16-autocast" if self.precision == Precision.BF16 else "float32",
            "attention": attention,
            "compile": self.compile,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **library_versions(),
            "threads": torch.get_num_threads(),
            "allocator": allocator(),
            "world_size": self.world_size,
        }

    def training_net(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a training loop calls forward and backward on: the model; under torchrun wrapped in DDP (gradients
        all-reduced, so every rank masks and steps identically); with `compile`, that compiled (DDP first, as torch
        recommends, so its compiler splits the graph at DDP's gradient buckets). Masking, clipping and the optimizer
        act on the model's own parameters, which every wrapper shares."""
        net = model
        if self.distributed:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.compile else net

    def union(self, items: set[str]) -> set[str]:
        """The union over ranks of each rank's set (under torchrun every rank sees only its share of a batch)."""
        if not self.distributed:
            return items
        gathered: list[set[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return set().union(*(g for g in gathered if g is not None))

    def total(self, rows: list[list[float]]) -> list[list[float]]:
        """The element-wise sum over ranks of each rank's rows (float64, so token and hit counts stay exact)."""
        if not self.distributed or not rows:  # every rank has the same number of rows
            return rows
        summed = torch.tensor(rows, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return summed.tolist()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when asked (fp32 master weights, the loss is computed in fp32), else nothing."""
        if self.precision == Precision.BF16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform calls the processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


#: Allocators that replace malloc when preloaded (LD_PRELOAD), known by their library's name.
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator() -> str:
    """The process's malloc: a preloaded jemalloc, tcmalloc or mimalloc (Linux: found among the loaded libraries),
    else `system` (the C library's). It moves step times and memory use, not results (docs/performance.md)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in _ALLOCATORS if f"/lib{name}" in maps), "system")


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    count = torch.cuda.device_count()  # NVML's count where it can: no CUDA context in this process
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in named.split(",")][:count] if named is not None else [str(i) for i in range(count)]


@contextlib.contextmanager
def stage_runtime(spec: RuntimeSpec) -> Iterator[Runtime]:
    """The device and precision `spec` asks for; launched by torchrun, inside its process group for the duration.

    A group joined here is left here: after every rank's last collective on success (a barrier, so that none tears
    down while another still needs it), at once on an error. A group the caller set up is the caller's to leave.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = spec.device == Device.CUDA or (spec.device == Device.AUTO and torch.cuda.is_available())
    if spec.device == Device.CUDA and not torch.cuda.is_available():
        raise RuntimeError("runtime.device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    device = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if spec.threads is not None and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    if spec.compile:
        _check_host_compiler(device)
    precision = spec.precision
    if precision == Precision.AUTO:
        precision = Precision.BF16 if device.type == "cuda" else Precision.FP32
    joins = world > 1 and not dist.is_initialized()
    if joins:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Runtime(device, precision, rank, world, local, compile=spec.compile)
        if joins:
            dist.barrier()
    finally:
        if joins:
            dist.destroy_process_group()
            # gloo's worker threads free finished collectives, and the Python tensors those hold, after the caller has
            # moved on, and need the GIL for it; in a process that exits first they abort it ("terminate called without
            # an active exception"; pytorch/pytorch#179291). DDP keeps the group alive past its destruction, so its
            # threads cannot be joined here: hand them the GIL for a moment instead.
            time.sleep(0.05)


#: What torch.compile builds kernels with, by device type: the environment variable that names it, else the
#: compilers looked for on PATH (inductor's CPU code is C++; on a GPU, Triton builds each kernel's launcher in C).
_HOST_COMPILERS = {"cpu": ("CXX", ("g++", "clang++")), "cuda": ("CC", ("gcc", "clang", "cc"))}


def _check_host_compiler(device: torch.device) -> None:
    """Refuse `runtime.compile` at once where torch's compiler could not build a kernel, instead of at the first
    step with a long traceback from inside torch."""
    if device.type not in _HOST_COMPILERS:
        return
    variable, names = _HOST_COMPILERS[device.type]
    named = os.environ.get(variable)  # when set, torch uses it and nothing else
    if shutil.which(named) if named else any(map(shutil.which, names)):
        return
    looked = f"{variable}={named!r} is not on PATH" if named else f"{variable} unset, no {' or '.join(names)}"
    raise ConfigError([Problem.at(("runtime", "compile"), f"torch.compile builds {device.type} kernels with a "
                                  f"compiler, and there is none ({looked}): install one (Debian: apt-get install "
                                  "g++), or set false", True)])


class ResourceMeter:
    """What a stage used from its start to `read`: CPU time, peak resident memory and, on CUDA, peak GPU memory
    (this process's: rank 0's under torchrun).

    The peak resident memory is the stage's own where Linux lets a process reset its high-water mark
    (/proc/self/clear_refs), else the process's since it started (`peak_rss_since`), which under the service, one
    process a stage, is the stage's own too."""

    def __init__(self, device: torch.device):
        self.device = device
        self.since = "stage" if _reset_peak_rss() else "process start"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = os.times()

    def read(self) -> dict[str, Any]:
        now = os.times()
        used: dict[str, Any] = {"cpu_user_s": round(now.user - self.start.user, 2),
                                "cpu_system_s": round(now.system - self.start.system, 2),
                                "peak_rss_gb": round(_peak_rss_bytes() / 2**30, 3), "peak_rss_since": self.since}
        if self.device.type == "cuda":
            used["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            used["cuda_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)
        return used


def _reset_peak_rss() -> bool:
    try:  # proc(5): writing 5 resets the peak resident set size to the current one (Linux 4.0+)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    import resource  # elsewhere: the process's peak, in bytes on macOS and KiB on Linux

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class StopFlag:
    """Set by SIGTERM/SIGINT (or by hand); checked at step boundaries, agreed across ranks."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        log.warning("signal %s: stopping at the next step boundary", signum)
        self.requested = True

    def should_stop(self, runtime: Runtime | None = None) -> bool:
        if runtime is None or not runtime.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


def setup_logging(runtime: Runtime | None = None, level: int = logging.INFO, handler: logging.Handler | None = None
                  ) -> None:
    """Rank 0 logs at `level`; other ranks only warnings, so multi-process output stays readable. `handler`: where
    records go instead of stderr (progress bars hand theirs in, which prints above the bars)."""
    if runtime is not None and not runtime.is_main:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[handler] if handler else None)
