"""Launching the engine child as the service does: `python -m sgtm_engine …` in one process, or under torchrun with
CPU ranks (gloo), one thread each so that ranks do not fight over the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sgtm_engine.stage import read_result

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launcher(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "sgtm_engine"]
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m", "sgtm_engine"]


def run_stage_cli(args: list[str], workdir: Path, ranks: int = 1) -> dict[str, Any]:
    """`run-stage <args> --workdir <workdir>` on `ranks` processes; the stage's result record."""
    subprocess.run([*launcher(ranks), *args, "--workdir", str(workdir)], check=True, env=ENV, timeout=600)
    return read_result(workdir)
