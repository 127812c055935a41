"""runtime.keep_freed_memory: large freed blocks stay with the process (no per-step mmap/munmap of big tensors)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from sgtm_engine.runtime import keep_freed_memory
tuned = sys.argv[1] == "keep" and keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
x = torch.ones(64, 2**20)  # 256 MB, far above glibc's largest dynamic mmap threshold (32 MB)
del x
print(tuned, round(rss_mb() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_large_tensors_stay_in_the_heap_only_when_asked() -> None:
    def probe(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        tuned, kept_mb = out.stdout.split()
        return tuned, int(kept_mb)

    default_tuned, default_kept = probe("default")
    keep_tuned, keep_kept = probe("keep")
    assert default_tuned == "False" and default_kept < 32  # unmapped on free: handed back to the OS
    assert keep_tuned == "True" and keep_kept > 200  # kept for the next step's allocation of the same size
