"""The training plan: one pool per step in proportion to upsampled examples, and the filter baselines."""

from __future__ import annotations

from collections import Counter

import pytest

from sgtm_engine.config import FilterKind, FilterMatching, FilterSpec, MaskMode, NoiseGranularity, NoiseSpec, Split
from sgtm_engine.data.schedule import PoolInfo, build_plan, entries_per_epoch
from sgtm_engine.errors import DataError

F, R, A = Split.FORGET, Split.RETAIN, Split.ADJACENT
POOLS = {
    "forget/forget": PoolInfo(F, MaskMode.FORGET, 90),
    "forget/default": PoolInfo(F, MaskMode.DEFAULT, 10),  # undiscovered forget
    "retain/default": PoolInfo(R, MaskMode.DEFAULT, 540),
    "retain/retain": PoolInfo(R, MaskMode.RETAIN, 60),
    "retain/forget": PoolInfo(R, MaskMode.FORGET, 20),  # false positives
    "adjacent/default": PoolInfo(A, MaskMode.DEFAULT, 280),
}
UP = {F: 1.0, R: 1.0, A: 1.0}


def _plan(steps: int = 1000, upsample: dict[Split, float] = UP, filter: FilterSpec | None = None, seed: int = 0,
          pools: dict[str, PoolInfo] = POOLS):  # noqa: ANN202
    return build_plan(pools, steps, upsample=upsample, noise=NoiseSpec(), filter=filter or FilterSpec(), seed=seed)


def test_one_epoch_matches_example_counts_exactly() -> None:
    plan = _plan(steps=1000)  # the epoch has exactly 1000 entries
    assert Counter(s.pool for s in plan) == {n: p.n_examples for n, p in POOLS.items()}
    assert plan.counts()["steps_per_mode"] == {"default": 830, "retain": 60, "forget": 110}
    assert plan.epochs == pytest.approx(1.0)


def test_proportions_with_upsampling_and_cycling() -> None:
    plan = _plan(steps=5000, upsample={F: 2.0, R: 1.0, A: 0.0})
    per_split = Counter(s.split for s in plan)
    assert per_split[A] == 0  # 0 removes the split
    # an epoch holds 200 forget + 620 retain entries; 5000 steps = 6.1 epochs, reshuffled each time
    assert per_split[F] / 5000 == pytest.approx(200 / 820, abs=0.01)
    assert plan.epochs == pytest.approx(5000 / 820, abs=1e-6)


def test_plan_is_seeded() -> None:
    assert list(_plan(seed=3)) == list(_plan(seed=3))
    assert list(_plan(seed=3)) != list(_plan(seed=4))


def test_small_pools_are_never_rounded_away() -> None:
    assert entries_per_epoch(1, 0.1) == 1 and entries_per_epoch(0, 5.0) == 0 and entries_per_epoch(10, 0.0) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Filters


def test_weak_filter_compute_matched_drops_labelled_forget() -> None:
    plan = _plan(steps=1000, filter=FilterSpec(FilterKind.WEAK, FilterMatching.COMPUTE))
    pools = Counter(s.pool for s in plan)
    assert len(plan) == 1000 and not any(s.skip for s in plan)
    assert pools["forget/forget"] == 0 and pools["retain/forget"] == 0  # everything labelled forget, FPs included
    assert pools["forget/default"] > 0  # undiscovered forget data stays: the "recall r" filter
    assert pools["adjacent/default"] / 1000 == pytest.approx(280 / 890, abs=0.03)  # same steps spent on the rest


def test_strict_filter_compute_matched_drops_adjacent_too() -> None:
    plan = _plan(steps=1000, filter=FilterSpec(FilterKind.STRICT, FilterMatching.COMPUTE))
    pools = Counter(s.pool for s in plan)
    assert set(pools) == {"forget/default", "retain/default", "retain/retain"}
    assert len(plan) == 1000


@pytest.mark.parametrize("kind", [FilterKind.WEAK, FilterKind.STRICT])
def test_epoch_matched_filter_skips_exactly_the_removed_steps(kind: FilterKind) -> None:
    plain = _plan(steps=1000)
    plan = _plan(steps=1000, filter=FilterSpec(kind, FilterMatching.EPOCH))
    assert [(s.pool, s.mode) for s in plan] == [(s.pool, s.mode) for s in plain]  # the same order, some skipped
    removed = {"forget/forget", "retain/forget"} | ({"adjacent/default"} if kind == FilterKind.STRICT else set())
    assert {s.pool for s in plan if s.skip} == removed
    assert all(s.skip == (s.pool in removed) for s in plan)
    counts = plan.counts()
    assert counts["steps"] == 1000 and counts["skipped_steps"] == sum(POOLS[p].n_examples for p in removed)


def test_batch_granularity_epoch_filter_skips_drawn_forget_steps() -> None:
    pools = {"forget": PoolInfo(F, None, 100), "retain": PoolInfo(R, None, 900)}
    noise = NoiseSpec(granularity=NoiseGranularity.BATCH, recall=0.9)
    plan = build_plan(pools, 20_000, upsample=UP, noise=noise, filter=FilterSpec(FilterKind.WEAK, FilterMatching.EPOCH),
                      seed=0)
    assert all(s.skip == (s.mode == MaskMode.FORGET) for s in plan)
    forget_steps = [s for s in plan if s.split == F]
    assert sum(not s.skip for s in forget_steps) / len(forget_steps) == pytest.approx(0.1, abs=0.02)


def test_filter_that_removes_everything_is_refused() -> None:
    pools = {"forget/forget": PoolInfo(F, MaskMode.FORGET, 10)}
    with pytest.raises(DataError, match="removes every training step"):
        _plan(steps=50, pools=pools, filter=FilterSpec(FilterKind.WEAK, FilterMatching.COMPUTE))
    with pytest.raises(DataError, match="no training data"):
        _plan(pools=pools, upsample={F: 0.0})


def test_counts_report_confusion_in_steps() -> None:
    counts = _plan(steps=1000).counts()
    conf = counts["label_confusion_steps"]
    assert conf["retain"] == {"default": 540, "retain": 60, "forget": 20}
    assert conf["forget"] == {"default": 10, "retain": 0, "forget": 90}
    assert counts["steps_per_pool"]["retain/forget"] == 20
