"""Cycling per-pool sampler with exact resume and DDP slicing.

Choices made here:
- Each pool cycles independently through seeded permutations of its rows: epoch e of pool p is
  `randperm(n)` from a generator seeded by sha256(seed, p, e), so the order depends only on (seed, pool, epoch), and
  the state is just (epoch, position) per pool. Resuming from `state_dict()` gives the same batches, bit for bit.
- A batch that crosses the end of an epoch takes the rest of the epoch, then continues in the next permutation (a pool
  smaller than the batch repeats rows within one batch).
- DDP: every rank draws the same global batch of `batch_size` rows and keeps the contiguous slice
  [rank * b / world, (rank + 1) * b / world); every rank advances by the whole batch, so states stay identical across
  ranks and the slices are disjoint and cover the batch. `batch_size` must be divisible by `world_size`.
- Skipped plan steps draw nothing: call `next_batch` only for steps that train.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from sgtm_engine.errors import DataError

STATE_VERSION = 1


class PoolSampler:
    """Hands out batches of rows from named pools (each a tensor [n, T + 1])."""

    def __init__(self, pools: Mapping[str, torch.Tensor], seed: int = 0):
        empty = sorted(n for n, t in pools.items() if t.shape[0] == 0)
        if empty:
            raise DataError(f"pools {empty} are empty; nothing can be sampled from them")
        self.pools = dict(pools)
        self.seed = seed
        self._epoch = dict.fromkeys(self.pools, 0)
        self._position = dict.fromkeys(self.pools, 0)
        self._perm: dict[str, tuple[int, torch.Tensor]] = {}  # pool -> (epoch, permutation), a cache

    def _permutation(self, pool: str, epoch: int) -> torch.Tensor:
        cached = self._perm.get(pool)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        digest = hashlib.sha256(f"sgtm-sampler:{self.seed}:{pool}:{epoch}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        perm = torch.randperm(self.pools[pool].shape[0], generator=gen)
        self._perm[pool] = (epoch, perm)
        return perm

    def next_indices(self, pool: str, batch_size: int) -> torch.Tensor:
        """Row indices of the next global batch of `pool` (advances the state)."""
        if pool not in self.pools:
            raise DataError(f"pool {pool!r} does not exist; pools: {sorted(self.pools)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        n = self.pools[pool].shape[0]
        parts = []
        need = batch_size
        while need:
            epoch, pos = self._epoch[pool], self._position[pool]
            take = min(need, n - pos)
            parts.append(self._permutation(pool, epoch)[pos:pos + take])
            pos += take
            need -= take
            if pos == n:
                epoch, pos = epoch + 1, 0
            self._epoch[pool], self._position[pool] = epoch, pos
        return torch.cat(parts)

    def next_batch(self, pool: str, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's slice of the next global batch of `pool`: LongTensor [batch_size / world_size, T + 1]."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size}: must be divisible by world_size={world_size}")
        per_rank = batch_size // world_size
        idx = self.next_indices(pool, batch_size)[rank * per_rank:(rank + 1) * per_rank]
        return self.pools[pool][idx].long()

    # -----------------------------------------------------------------------------------------------------------------
    # Resume

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed,
                "pools": {p: {"epoch": self._epoch[p], "position": self._position[p],
                              "size": int(self.pools[p].shape[0])} for p in sorted(self.pools)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore positions; refuses a state from other data (pool names or sizes differ) or another seed."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r}: expected {STATE_VERSION}")
        if state["seed"] != self.seed:
            raise DataError(f"sampler state has seed {state['seed']}, this sampler {self.seed}: not the same run")
        saved = state["pools"]
        mine = {p: int(t.shape[0]) for p, t in self.pools.items()}
        theirs = {p: int(s["size"]) for p, s in saved.items()}
        if mine != theirs:
            raise DataError(f"sampler state is for pools {theirs}, the data has {mine}: the data changed")
        for p, s in saved.items():
            if not 0 <= s["position"] < mine[p] or s["epoch"] < 0:
                raise DataError(f"sampler state for pool {p!r} is out of range: {s}")
            self._epoch[p], self._position[p] = int(s["epoch"]), int(s["position"])
