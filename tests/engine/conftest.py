"""Fixtures shared by the engine's end-to-end tests (attack, RMU, conditional training)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session: modules that prepare the same corpus share its tokenizer and token arrays."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread (and leave the other core to whoever shares the machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
