"""The cycling per-pool sampler: epochs are permutations, resume is exact, rank slices partition the batch."""

from __future__ import annotations

import pytest
import torch

from sgtm_engine.data.sampler import PoolSampler
from sgtm_engine.errors import DataError


def _pools() -> dict[str, torch.Tensor]:
    # row i of pool p holds (p, i) so a batch says where it came from
    return {"a": torch.stack([torch.tensor([0, i, 0]) for i in range(10)]),
            "b": torch.stack([torch.tensor([1, i, 1]) for i in range(3)])}


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    s = PoolSampler(_pools(), seed=0)
    first = s.next_indices("a", 10)
    second = s.next_indices("a", 10)
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()
    assert s.state_dict()["pools"]["a"] == {"epoch": 2, "position": 0, "size": 10}


def test_batches_cross_epochs_and_small_pools_wrap() -> None:
    s = PoolSampler(_pools(), seed=0)
    batch = s.next_batch("b", 8)
    assert batch.shape == (8, 3) and batch.dtype == torch.long
    assert set(batch[:, 1].tolist()) == {0, 1, 2} and (batch[:, 0] == 1).all()


def test_resume_is_exact() -> None:
    s = PoolSampler(_pools(), seed=5)
    for pool, n in [("a", 3), ("b", 2), ("a", 4), ("a", 6), ("b", 5)]:
        s.next_batch(pool, n)
    state = s.state_dict()
    resumed = PoolSampler(_pools(), seed=5)
    resumed.load_state_dict(state)
    for pool, n in [("a", 7), ("b", 4), ("a", 11), ("b", 1)]:
        assert torch.equal(s.next_batch(pool, n), resumed.next_batch(pool, n))


def test_rank_slices_are_disjoint_and_cover_the_batch() -> None:
    world = 4
    full = PoolSampler(_pools(), seed=1)
    ranks = [PoolSampler(_pools(), seed=1) for _ in range(world)]
    for _ in range(5):  # several steps: the ranks stay in lockstep
        whole = full.next_indices("a", 8)
        parts = [r.next_batch("a", 8, rank=i, world_size=world) for i, r in enumerate(ranks)]
        assert all(p.shape == (2, 3) for p in parts)
        assert torch.equal(torch.cat(parts), _pools()["a"][whole])
        assert all(r.state_dict() == full.state_dict() for r in ranks)


def test_bad_arguments_and_mismatched_state() -> None:
    s = PoolSampler(_pools(), seed=0)
    with pytest.raises(ValueError, match="divisible"):
        s.next_batch("a", 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        s.next_batch("a", 4, rank=4, world_size=4)
    with pytest.raises(DataError, match="does not exist"):
        s.next_batch("zzz", 4)
    state = s.state_dict()
    with pytest.raises(DataError, match="seed"):
        PoolSampler(_pools(), seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="the data changed"):
        PoolSampler({"a": _pools()["a"][:9], "b": _pools()["b"]}, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="empty"):
        PoolSampler({"a": torch.zeros(0, 3, dtype=torch.long)})
