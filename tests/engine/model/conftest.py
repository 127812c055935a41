"""`kernels`: run a test with the engine's C kernels on and off (model/cpu_kernels.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sgtm_engine.model import cpu_kernels


@pytest.fixture(params=[True, False], ids=["c-kernels", "torch-kernels"])
def kernels(request: pytest.FixtureRequest) -> Iterator[bool]:
    before = cpu_kernels.enabled()
    cpu_kernels.set_enabled(request.param)
    if request.param and cpu_kernels.library() is None:
        cpu_kernels.set_enabled(before)
        pytest.skip(f"the C kernels cannot be built here: {cpu_kernels.unavailable_reason()}")
    yield request.param
    cpu_kernels.set_enabled(before)
