"""The engine's C kernels for CPU training (kernels/*.c): built on first use, loaded with ctypes, run on threads.

Why C: at the paper's small shapes a CPU step is dominated by work that torch's generic kernels do badly, not by
matmuls: attention over 4-8-dim heads (fused_attention.py) and elementwise passes over a [tokens, 50257] logit
matrix (loss.py). benchmarks/bench_model.py measures the result against stock HF side by side.

How: the sources are compiled with the system C compiler for this machine (`-march=native`, never -ffast-math) into
a content-addressed cache (`~/.cache/sgtm/kernels`, keyed by sources, flags, compiler and CPU features; an atomic
rename makes concurrent builders safe). Each call runs on `torch.get_num_threads()` threads over disjoint ranges
(ctypes releases the GIL). With no compiler or a failed build, `library()` returns None, the reason is logged once,
and every caller keeps its torch path; `set_enabled(False)` (runtime.cpu_kernels: false) does the same on purpose.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).with_name("kernels")).glob("*.[ch]"))
KERNEL_DIR = Path.home() / ".cache" / "sgtm" / "kernels"

_enabled = True
_lib: ctypes.CDLL | None = None
_error: str | None = None
_build_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


class Strides(ctypes.Structure):
    """Element strides of a [B, T, H, D] tensor's first three dims (D is contiguous)."""

    _fields_ = [("b", ctypes.c_int64), ("t", ctypes.c_int64), ("h", ctypes.c_int64)]


def set_enabled(enabled: bool) -> None:
    """False: `library()` answers None, so every caller uses torch's kernels (for comparisons and bisecting)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when switched off or when they cannot be built here
    (the reason is logged once)."""
    global _lib, _error
    if not _enabled:
        return None
    if _lib is not None or _error is not None:
        return _lib
    with _build_lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if compiler is None:
                raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
            try:
                path = _build(compiler, KERNEL_DIR)
            except PermissionError:
                path = _build(compiler, Path(tempfile.gettempdir()) / "sgtm-kernels")
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or ""
            _error = f"{exc} {detail[-800:]}".strip()
            log.warning("the engine's C kernels are unavailable, using torch's kernels instead: %s", _error)
    return _lib


def for_tensor(x: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, where they can run on `x`: fp32 on CPU, outside torch.compile tracing (an opaque ctypes call
    would break the graph, so compiled models keep torch's ops). Callers keep the returned library for their backward,
    so switching the kernels off between a forward and its backward cannot strand a graph."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    return library()


def unavailable_reason() -> str | None:
    return _error


def _compile_flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fPIC", "-std=gnu11"]  # never -ffast-math: simd.h's exp relies on IEEE order
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # gcc defaults to 256-bit vectors even where 512 exist
    return flags


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache shared across machines must not mix them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, out_dir: Path) -> Path:
    flags = _compile_flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join(flags).encode(), version.encode(),
                 _cpu_signature().encode()]:
        digest.update(part + b"\0")
    target = out_dir / f"sgtm-kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        objects = []
        for source in (p for p in SOURCES if p.suffix == ".c"):
            obj = Path(tmp) / f"{source.stem}.o"
            subprocess.run([compiler, *flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True,
                           check=True)
            objects.append(str(obj))
        lib = Path(tmp) / "kernels.so"
        subprocess.run([compiler, "-shared", *objects, "-o", str(lib), "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(lib, target)  # atomic: concurrent builders (workers) never load a half-written file
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, s, i64, f32 = ctypes.c_void_p, Strides, ctypes.c_int64, ctypes.c_float
    signatures = {
        "sgtm_attention_forward": [p, p, p, s, s, s, p, s, p, i64, i64, i64, i64, f32, i64, i64],
        "sgtm_attention_backward": [p, p, p, p, p, p, s, s, s, s, s, p, p, p, s, i64, i64, i64, i64, f32, i64, i64],
        "sgtm_ce_forward": [p, i64, p, p, i64, p, p, p, p, i64, i64],
        "sgtm_ce_backward": [p, i64, p, i64, p, p, p, i64, i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


def _reset_pool_after_fork() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0  # the parent's threads do not exist in a forked child


os.register_at_fork(after_in_child=_reset_pool_after_fork)

ERRORS: dict[int, tuple[type[Exception], str]] = {
    1: (MemoryError, "a C kernel could not allocate its work buffers"),
    2: (ValueError, "head dim outside the attention kernel's range [1, 64]"),
    3: (IndexError, "a label is outside [0, vocab_size) and is not the ignore index"),
}


def threads_for(n_tasks: int) -> int:
    return max(1, min(torch.get_num_threads(), n_tasks))


def parallel(fn: Callable[[int, int, int], int], n_tasks: int) -> None:
    """fn(worker, lo, hi) over [0, n_tasks), split into threads_for(n_tasks) contiguous ranges; raises on an
    error code (ERRORS)."""
    global _pool, _pool_size
    n = threads_for(n_tasks)
    bounds = [n_tasks * j // n for j in range(n + 1)]
    if n == 1:
        codes = [fn(0, 0, n_tasks)]
    else:
        if _pool is None or _pool_size < n - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)  # more threads asked for (torch.set_num_threads): replace, do not leak
            _pool, _pool_size = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="sgtm-kernel"), n - 1
        futures = [_pool.submit(fn, j, bounds[j], bounds[j + 1]) for j in range(1, n)]
        codes = [fn(0, bounds[0], bounds[1])] + [f.result() for f in futures]
    for code in codes:
        if code:
            kind, message = ERRORS.get(code, (RuntimeError, f"C kernel failed with code {code}"))
            raise kind(message)


def strides(x: torch.Tensor) -> Strides:
    return Strides(x.stride(0), x.stride(1), x.stride(2))
