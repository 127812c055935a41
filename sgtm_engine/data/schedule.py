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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainingPlan:
    """Per-step entries plus what they add up to."""

    steps: tuple[PlanStep, ...]
    pools: Mapping[str, PoolInfo]
    entries: Mapping[str, int]  # per schedule epoch
    rates: StepRates | None  # batch granularity only
    epochs: float  # schedule epochs consumed

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, step: int) -> PlanStep:
        return self.steps[step]

    def __iter__(self) -> Iterator[PlanStep]:
        return iter(self.steps)

    def counts(self) -> dict[str, Any]:
        """Steps per mode and pool, skipped steps, and the label confusion matrix in steps, for logging."""
        trained = [s for s in self.steps if not s.skip]
        skipped = [s for s in self.steps if s.skip]
        return {
            "steps": len(self.steps),
            "trained_steps": len(trained),
            "skipped_steps": len(skipped),
            "steps_per_mode": {m.value: sum(s.mode == m for s in trained) for m in MaskMode},
            "steps_per_pool": dict(sorted(Counter(s.pool for s in trained).items())),
            "skipped_per_pool": dict(sorted(Counter(s.pool for s in skipped).items())),
            "label_confusion_steps": confusion((s.split, s.mode) for s in trained),
            "schedule_epochs": round(self.epochs, 4),
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

    rng = random.Random(f"sgtm-schedule:{seed}:{noise.seed}")
    out: list[PlanStep] = []
    epochs = 0.0
    while len(out) < steps:
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
            out.append(PlanStep(name, info.split, mode, removed))
            kept += not removed
            if len(out) == steps:
                break
        epochs += taken / len(order)
        if kept == 0 and taken == len(order):
            raise DataError(f"filter {filter.kind.value}: it removes every training step; "
                            f"keep some retain data or use filter.kind='none'")
    return TrainingPlan(tuple(out), dict(pools), entries, rates, epochs)
