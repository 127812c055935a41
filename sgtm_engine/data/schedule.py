"""The training plan: which pool and which mode each optimizer step uses, and which steps a filter skips. Pure.

Choices made here:
- One pool per optimizer step (gradient masks apply to the summed gradient, so a step's examples share one label).
  One schedule epoch lists every pool round(n_examples * upsample[split]) times (at least once when both are > 0;
  0 removes the pool), shuffled with a `random.Random` seeded by (train seed, noise seed); epochs repeat, reshuffled,
  until `steps` entries are taken. The share of steps per pool therefore equals its share of (upsampled) examples.
- The mode is the pool's fixed label (document granularity) or drawn per step with the same RNG (batch granularity,
  noise.draw_mode, rates from the counts of one schedule epoch).
- Filters remove data labelled forget (weak) and, for strict, every adjacent entry too. Compute matching drops the
  removed entries and keeps drawing, so `steps` optimizer steps are spent on the rest (the paper's Wikipedia
  filters); epoch matching keeps them in the plan with `skip=True`: no data is drawn, no optimizer step is taken, but
  the step index and LR schedule still count them (the paper's TinyStories filters).
- Modes are planned as labelled; a clean model (strategy none) applies every step as `default` at training time.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from sgtm_engine.config import FilterKind, FilterMatching, FilterSpec, MaskMode, NoiseSpec, Split
from sgtm_engine.data.noise import StepRates, confusion, draw_mode, step_rates
from sgtm_engine.errors import DataError


class PoolInfo(NamedTuple):
    split: Split
    mode: MaskMode | None  # None: drawn per step
    n_examples: int


class PlanStep(NamedTuple):
    pool: str
    split: Split
    mode: MaskMode
    skip: bool  # epoch-matched filter: count the step, draw no data, take no optimizer step


def pool_removed(split: Split, mode: MaskMode | None, filter: FilterSpec) -> bool:
    """Whether a filter removes data of this true split and applied label (mode None: only by its split)."""
    if filter.kind == FilterKind.NONE:
        return False
    return mode == MaskMode.FORGET or (filter.kind == FilterKind.STRICT and split == Split.ADJACENT)


def entries_per_epoch(n_examples: int, upsample: float) -> int:
    if n_examples == 0 or upsample == 0:
        return 0
    return max(1, int(n_examples * upsample + 0.5))  # a small pool is never rounded away


# ---------------------------------------------------------------------------------------------------------------------
# The plan


class TrainingPlan:
    """Per-step entries plus what they add up to. The entries are generated epoch by epoch as they are read, never
    stored all at once: a plan of a billion steps holds one schedule epoch in memory. Reading in step order (as
    training does) is O(1) a step; reading backwards regenerates from the start (the plan is a pure function)."""

    def __init__(self, n_steps: int, pools: Mapping[str, PoolInfo], entries: Mapping[str, int],
                 rates: StepRates | None, generate: Callable[[], Iterator[tuple[PlanStep, float]]]):
        self.n_steps = n_steps
        self.pools = pools
        self.entries = entries  # per schedule epoch
        self.rates = rates  # batch granularity only
        self._generate = generate
        self._cursor: Iterator[tuple[PlanStep, float]] | None = None
        self._index = -1
        self._current: PlanStep | None = None

    def __len__(self) -> int:
        return self.n_steps

    def __getitem__(self, step: int) -> PlanStep:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} is outside the plan's {self.n_steps} steps")
        if self._cursor is None or step < self._index:
            self._cursor, self._index = self._generate(), -1
        while self._index < step:
            self._current, _ = next(self._cursor)
            self._index += 1
        assert self._current is not None
        return self._current

    def __iter__(self) -> Iterator[PlanStep]:
        return (entry for entry, _ in self._generate())

    @property
    def epochs(self) -> float:
        """Schedule epochs the plan consumes (one pass over it)."""
        consumed = 0.0
        for _entry, consumed in self._generate():  # noqa: B007 - the last value is the total
            pass
        return consumed

    def counts(self) -> dict[str, Any]:
        """Steps per mode and pool, skipped steps, and the label confusion matrix in steps, for logging (one pass
        over the plan, counters only)."""
        per_mode: Counter[MaskMode] = Counter()
        per_pool: Counter[str] = Counter()
        skipped_per_pool: Counter[str] = Counter()
        labels: Counter[tuple[Split, MaskMode]] = Counter()
        epochs = 0.0
        for entry, consumed in self._generate():
            epochs = consumed
            if entry.skip:
                skipped_per_pool[entry.pool] += 1
            else:
                per_mode[entry.mode] += 1
                per_pool[entry.pool] += 1
                labels[(entry.split, entry.mode)] += 1
        trained = sum(per_pool.values())
        return {
            "steps": self.n_steps,
            "trained_steps": trained,
            "skipped_steps": self.n_steps - trained,
            "steps_per_mode": {m.value: per_mode[m] for m in MaskMode},
            "steps_per_pool": dict(sorted(per_pool.items())),
            "skipped_per_pool": dict(sorted(skipped_per_pool.items())),
            "label_confusion_steps": confusion(labels.elements()),
            "schedule_epochs": round(epochs, 4),
        }


def build_plan(pools: Mapping[str, PoolInfo], steps: int, *, upsample: Mapping[Split, float], noise: NoiseSpec,
               filter: FilterSpec, seed: int) -> TrainingPlan:
    """The plan of `steps` optimizer steps (skipped ones included).

    Args:
        pools: name -> (true split, fixed mode or None, number of examples).
        steps: optimizer steps, as counted by the LR schedule.
        upsample: factor per true split (0 removes it).
        noise: label noise (batch granularity draws modes here).
        filter: the filter baseline and how it is matched.
        seed: the data-order seed (with noise.seed, seeds the shuffle and the per-step draws).
    """
    if steps < 1:
        raise DataError(f"steps={steps}: a plan needs at least one step")
    names = sorted(pools)
    entries = {n: entries_per_epoch(pools[n].n_examples, upsample.get(pools[n].split, 1.0)) for n in names}
    epoch = [n for n in names for _ in range(entries[n])]
    if not epoch:
        raise DataError("no training data: every pool is empty or its split has upsampling 0")
    rates = None
    if any(pools[n].mode is None for n in names):
        per_split: Counter[Split] = Counter()
        for n in names:
            per_split[pools[n].split] += entries[n]
        rates = step_rates(noise, per_split)

    def generate() -> Iterator[tuple[PlanStep, float]]:
        """(entry, schedule epochs consumed through it) for every step, in order."""
        rng = random.Random(f"sgtm-schedule:{seed}:{noise.seed}")
        produced, epochs = 0, 0.0
        while produced < steps:
            order = epoch.copy()
            rng.shuffle(order)
            kept = taken = 0
            for name in order:
                taken += 1
                info = pools[name]
                mode = info.mode if info.mode is not None else draw_mode(info.split, rates, rng)  # type: ignore[arg-type]
                removed = pool_removed(info.split, mode, filter)
                if removed and filter.matching == FilterMatching.COMPUTE:
                    continue
                produced += 1
                kept += not removed
                yield PlanStep(name, info.split, mode, removed), epochs + taken / len(order)
                if produced == steps:
                    return
            epochs += 1.0
            if kept == 0:
                raise DataError(f"filter {filter.kind.value}: it removes every training step; "
                                f"keep some retain data or use filter.kind='none'")

    for _ in zip(range(min(steps, len(epoch) + 1)), generate(), strict=False):
        pass  # a filter that removes everything fails here, at build time, not steps into training
    return TrainingPlan(steps, dict(pools), entries, rates, generate)
