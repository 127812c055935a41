"""Recovery from an attack: pure functions of a forget-loss curve and the reference it is measured against.

Stdlib only. The attack stage records a `Recovery` in its result's `summary`, and sweep reports read it from
there. The definitions are docs/method.md §12's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def steps_to_recovery(curve: Sequence[tuple[int, float]], reference: float) -> int | None:
    """The first evaluated step whose forget loss is <= `reference`, or None if none is.

    Args:
        curve: (step, forget loss) per evaluation, in any order (sorted here); NaN never counts as recovered.
        reference: the no-filter baseline's forget loss.
    """
    for step, loss in sorted(curve):
        if loss <= reference:  # NaN compares False
            return step
    return None


def mean_excess(curve: Sequence[tuple[int, float]], reference: float) -> float | None:
    """The mean forget-loss excess over `reference` along the attack (nats): the area between the piecewise-linear
    curve and the reference where the curve is above it, divided by the steps the curve spans. It grades attacks
    that do not recover within their budget, which steps to recovery cannot, and reads the whole curve, not only its
    last point. 0 for a model at or below the reference throughout; None for fewer than two points, or any NaN.

    Args:
        curve: (step, forget loss) per evaluation, in any order (sorted here).
        reference: the no-filter baseline's forget loss.
    """
    points = sorted((step, loss - reference) for step, loss in curve)
    if len(points) < 2 or points[-1][0] == points[0][0] or not all(math.isfinite(g) for _, g in points):
        return None
    area = 0.0
    for (s0, g0), (s1, g1) in itertools.pairwise(points):
        if g0 >= 0 and g1 >= 0:
            area += (g0 + g1) / 2 * (s1 - s0)
        elif g0 > 0 or g1 > 0:  # the segment crosses the reference: only the triangle above it counts
            area += max(g0, g1) ** 2 / (abs(g0) + abs(g1)) * (s1 - s0) / 2
    return area / (points[-1][0] - points[0][0])


@dataclass(frozen=True)
class Recovery:
    """Steps and forget tokens an attacker needed to reach the reference, or None when it did not within `steps`;
    the curve's mean excess over the reference (`mean_excess`), recovered or not; its first and last points."""

    reference: float
    steps: int  # the attack's length
    step: int | None
    forget_tokens: int | None
    tokens: int | None
    mean_excess: float | None
    start: float | None
    """The forget loss at the curve's first evaluation (step 0: the attacked model as it came)."""
    end: float | None
    """The forget loss at the curve's last evaluation."""

    @property
    def recovered(self) -> bool:
        return self.step is not None

    @property
    def end_gap(self) -> float | None:
        """The last forget loss minus the reference: <= 0 ended recovered, > 0 is what the attack left."""
        return None if self.end is None else self.end - self.reference

    def describe(self) -> str:
        if self.step is None:
            return f"not recovered within {self.steps} steps"
        return f"recovered at step {self.step} ({self.forget_tokens:,} forget tokens)"

    def as_dict(self) -> dict[str, Any]:
        return {"reference_forget_loss": self.reference, "steps": self.steps, "recovered": self.recovered,
                "steps_to_recovery": self.step, "forget_tokens_to_recovery": self.forget_tokens,
                "tokens_to_recovery": self.tokens, "mean_excess_forget_loss": self.mean_excess,
                "start_forget_loss": self.start, "end_forget_loss": self.end, "end_gap": self.end_gap,
                "verdict": self.describe()}


def recovery_from_history(history: Sequence[Mapping[str, Any]], reference: float, key: str, steps: int) -> Recovery:
    """Recovery of an attack's evaluation history (records with `step`, `tokens`, `forget_tokens`, `metrics`)."""
    curve = sorted((int(h["step"]), float(h["metrics"].get(key, float("nan")))) for h in history)
    step, excess = steps_to_recovery(curve, reference), mean_excess(curve, reference)
    start, end = (curve[0][1], curve[-1][1]) if curve else (None, None)
    if step is None:
        return Recovery(reference, steps, None, None, None, excess, start, end)
    at = next(h for h in history if int(h["step"]) == step)
    return Recovery(reference, steps, step, int(at["forget_tokens"]), int(at["tokens"]), excess, start, end)
