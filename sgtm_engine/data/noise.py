"""Label noise: which label (`MaskMode`) each document or each step gets. Pure, seeded functions.

Two granularities (`NoiseSpec.granularity`):
- document (our default): every training document gets one applied label for the whole run, as a deterministic
  classifier would give. Counts are exact (a seeded sample of round(rate * n) documents, not coin flips):
    true forget: round(TPR * n_forget) caught (TPR = recall or tpr); of those, round(forget_retain_frac * caught) get
      `retain`, the rest `forget`; the uncaught get `default` (the paper's "undiscovered" data).
    false positives: precision/recall: round(TP * (1/P - 1)); TPR/FPR: round(FPR * N_negatives) (the corrected
      definition; the reference's FP = FPR * TP is not reproduced). They get `forget` and are placed by
      `fp_source`: uniformly over retain + adjacent (default), adjacent first, or adjacent only (the reference).
      A count above what the source holds saturates (logged).
    the other adjacent / retain documents: round(adjacent_retain_frac / retain_retain_frac * n) get `retain`, the
      rest `default`. The retain-mode fractions are therefore per document too: a fixed subset of documents is
      always trained in retain mode, which keeps "one label per document" true for every label.
  Documents are then packed into pools by (true split, applied label), so every step of a pool has one mode.
- batch (paper parity): pools are the true splits and each step's mode is drawn with the schedule's RNG:
    forget -> default w.p. 1 - TPR, else retain w.p. forget_retain_frac, else forget;
    adjacent -> forget w.p. p_FP(adjacent), else retain w.p. adjacent_retain_frac, else default;
    retain -> forget w.p. p_FP(retain), else retain w.p. retain_retain_frac, else default,
  where the false-positive probabilities turn the same FP count (computed in steps per epoch) into per-step rates.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sgtm_engine.config import FalsePositiveSource, MaskMode, NoiseModel, NoiseSpec, Split

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Shared arithmetic


def _round(x: float) -> int:
    return int(x + 0.5)  # half up: Python's round() would round 2.5 and 3.5 to different sides


def false_positive_count(noise: NoiseSpec, true_positives: float, negatives: float) -> float:
    """How many negatives (documents or steps) the classifier flags as forget."""
    if noise.model == NoiseModel.PRECISION_RECALL:
        return true_positives * (1 / noise.precision - 1)
    return noise.fpr * negatives


def place_false_positives(noise: NoiseSpec, count: float, n_retain: float, n_adjacent: float) -> tuple[float, float]:
    """(false positives from retain, from adjacent), saturating at what each source holds."""
    if noise.fp_source == FalsePositiveSource.RETAIN_AND_ADJACENT:
        total = n_retain + n_adjacent
        share = min(count, total) / total if total else 0.0
        placed = (share * n_retain, share * n_adjacent)
    else:
        from_adjacent = min(count, n_adjacent)
        rest = count - from_adjacent if noise.fp_source == FalsePositiveSource.ADJACENT_FIRST else 0.0
        placed = (min(rest, n_retain), from_adjacent)
    if sum(placed) + 1e-9 < count:
        log.warning("label noise asks for %.1f false positives but %s holds only %.1f: saturated",
                    count, noise.fp_source.value, sum(placed))
    return placed


def pool_name(split: Split, mode: MaskMode | None) -> str:
    """'retain/forget' = true retain data labelled forget (document granularity); 'retain' (batch granularity)."""
    return split.value if mode is None else f"{split.value}/{mode.value}"


# ---------------------------------------------------------------------------------------------------------------------
# Per document


def assign_document_labels(docs: Mapping[Split, Sequence[str]], noise: NoiseSpec) -> dict[str, MaskMode]:
    """The applied label of every training document (ids per true split, in a fixed order)."""
    rng = random.Random(f"sgtm-noise:{noise.seed}")
    forget = list(docs.get(Split.FORGET, ()))
    retain = list(docs.get(Split.RETAIN, ()))
    adjacent = list(docs.get(Split.ADJACENT, ()))
    labels = dict.fromkeys(forget + retain + adjacent, MaskMode.DEFAULT)

    caught = rng.sample(forget, _round(noise.true_positive_rate * len(forget)))
    as_retain = set(rng.sample(caught, _round(noise.forget_retain_frac * len(caught))))
    for d in caught:
        labels[d] = MaskMode.RETAIN if d in as_retain else MaskMode.FORGET

    fp = false_positive_count(noise, len(caught), len(retain) + len(adjacent))
    fp_retain, fp_adjacent = place_false_positives(noise, fp, len(retain), len(adjacent))
    if noise.fp_source == FalsePositiveSource.RETAIN_AND_ADJACENT:
        # one draw over all negatives, so each negative is equally likely to be flagged (FPR semantics)
        flagged = set(rng.sample(retain + adjacent, min(_round(fp), len(retain) + len(adjacent))))
    else:
        flagged = set(rng.sample(adjacent, _round(fp_adjacent))) | set(rng.sample(retain, _round(fp_retain)))
    for d in flagged:
        labels[d] = MaskMode.FORGET

    for pool, frac in ((adjacent, noise.adjacent_retain_frac), (retain, noise.retain_retain_frac)):
        rest = [d for d in pool if d not in flagged]
        for d in rng.sample(rest, _round(frac * len(rest))):
            labels[d] = MaskMode.RETAIN
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# Per batch (per step)


@dataclass(frozen=True)
class StepRates:
    """Per-step probabilities of the batch granularity."""

    false_negative: float  # forget -> default
    forget_retain: float  # caught forget -> retain mode
    fp_retain: float  # retain -> forget
    fp_adjacent: float  # adjacent -> forget
    retain_retain: float
    adjacent_retain: float


def step_rates(noise: NoiseSpec, steps: Mapping[Split, int]) -> StepRates:
    """Per-step rates from the number of steps per true split in one epoch of the schedule."""
    n_f, n_r, n_a = (steps.get(s, 0) for s in (Split.FORGET, Split.RETAIN, Split.ADJACENT))
    tp = noise.true_positive_rate * n_f
    fp_r, fp_a = place_false_positives(noise, false_positive_count(noise, tp, n_r + n_a), n_r, n_a)
    return StepRates(false_negative=1 - noise.true_positive_rate, forget_retain=noise.forget_retain_frac,
                     fp_retain=fp_r / n_r if n_r else 0.0, fp_adjacent=fp_a / n_a if n_a else 0.0,
                     retain_retain=noise.retain_retain_frac, adjacent_retain=noise.adjacent_retain_frac)


def draw_mode(split: Split, rates: StepRates, rng: random.Random) -> MaskMode:
    """One step's applied label; every branch consumes fresh uniform draws from `rng` (shared by all ranks)."""
    if split == Split.FORGET:
        if rng.random() < rates.false_negative:
            return MaskMode.DEFAULT
        return MaskMode.RETAIN if rng.random() < rates.forget_retain else MaskMode.FORGET
    fp, keep = ((rates.fp_adjacent, rates.adjacent_retain) if split == Split.ADJACENT
                else (rates.fp_retain, rates.retain_retain))
    if rng.random() < fp:
        return MaskMode.FORGET
    return MaskMode.RETAIN if rng.random() < keep else MaskMode.DEFAULT


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def confusion(pairs: Iterable[tuple[Split, MaskMode]]) -> dict[str, dict[str, int]]:
    """{true split: {applied label: count}}, every cell present (zeros included) for stable logging."""
    out = {s.value: {m.value: 0 for m in MaskMode} for s in Split}
    for split, mode in pairs:
        out[split.value][mode.value] += 1
    return out
