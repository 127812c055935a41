"""The engine child: its command line, and a process group the supervisor can signal as a whole.

Choices made here:
- `start_new_session=True`: the child leads its own process group, so SIGTERM/SIGKILL reach torchrun's workers and
  any DataLoader workers too, and a Ctrl-C aimed at the worker does not hit the child directly.
- stdin is a lifeline (`sgtm_engine.lifeline`, `run-stage --stdin-lifeline`): a pipe the supervisor holds and never
  writes. If the supervisor dies (kill -9, OOM) the kernel closes its end, and the engine stops as on SIGTERM
  (checkpointing at the next step boundary) and exits at most `cancel_grace_s` later, so no orphan keeps training on
  a job the reaper is about to requeue. torchrun's workers inherit stdin and watch it themselves.
- Output goes to `<workdir>/logs/attempt-<n>.log`; its tail becomes the job's error message on failure.
- An explicit, minimal environment (`engine_env`): the toolchain, locale, accelerator and thread settings, MLflow's
  own client credentials, and the names the operator lists in `engine_env_passthrough`. Never the service's
  settings (`SGTM_*`: API tokens, database and broker URLs with their passwords) nor anything else a worker
  happens to have: a training run executes user-chosen configurations and has no use for them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from api.config import Settings


def build_argv(settings: Settings, *, kind: str, spec_path: Path, workdir: Path, inputs: Mapping[str, Path],
               mlflow_uri: str | None, mlflow_run_id: str | None, gpus: int) -> list[str]:
    """`… run-stage --kind K --spec S --workdir W --stdin-lifeline GRACE [--input NAME=DIR …] [--mlflow-uri U
    --mlflow-run-id R] [--cache-dir C]`, under torchrun for more than one GPU."""
    tail = ["run-stage", "--kind", kind, "--spec", str(spec_path), "--workdir", str(workdir),
            "--stdin-lifeline", str(settings.cancel_grace_s)]
    for name, path in sorted(inputs.items()):
        tail += ["--input", f"{name}={path}"]
    if mlflow_uri and mlflow_run_id:
        tail += ["--mlflow-uri", mlflow_uri, "--mlflow-run-id", mlflow_run_id]
    if settings.engine_cache_dir is not None:
        tail += ["--cache-dir", str(settings.engine_cache_dir)]
    if gpus > 1:
        return [*settings.torchrun_command, "--standalone", f"--nproc_per_node={gpus}", "-m", "sgtm_engine", *tail]
    return [*settings.engine_command, *tail]


#: Inherited by name: program lookup, home, locale, time zone, temp folder, the Python environment, the dynamic
#: loader (a preloaded allocator), offline switches of the HF libraries, MLflow's client credentials (the child logs
#: its metrics itself) and the image's code version.
ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "MALLOC_CONF", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "SGTM_CODE_VERSION",
})
#: Inherited by prefix: locale categories and the accelerator, collective and thread-pool settings.
ENGINE_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "TORCH_", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_")


def engine_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine child's whole environment, chosen from ours (see the module doc)."""
    source = os.environ if environ is None else environ
    passthrough = set(settings.engine_env_passthrough)
    env = {key: value for key, value in source.items()
           if key in ENGINE_ENV_NAMES or key in passthrough or key.startswith(ENGINE_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A started engine process (group)."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, log_path: Path, env: Mapping[str, str],
                 pass_fds: Sequence[int] = ()):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # stdin: the lifeline, open until cleanup() or our death
                list(argv), cwd=cwd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env), start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds))
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """After the child exited: kill whatever is left of its group (a stray DataLoader or torchrun worker)."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.signal_group(signal.SIGKILL)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, self.log_path.stat().st_size - limit))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
