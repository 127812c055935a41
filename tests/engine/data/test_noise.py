"""Label noise at both granularities and with both noise models; the corrected FPR (FP = FPR * negatives)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sgtm_engine.config import (
    FalsePositiveSource,
    FilterSpec,
    MaskMode,
    NoiseGranularity,
    NoiseModel,
    NoiseSpec,
    Split,
)
from sgtm_engine.data.noise import assign_document_labels, draw_mode, step_rates
from sgtm_engine.data.schedule import PoolInfo, build_plan

F, R, A = Split.FORGET, Split.RETAIN, Split.ADJACENT
DOCS = {F: [f"f{i}" for i in range(1000)], R: [f"r{i}" for i in range(6000)], A: [f"a{i}" for i in range(2000)]}
UP = {F: 1.0, R: 1.0, A: 1.0}


def _labels_by_split(noise: NoiseSpec) -> dict[Split, Counter[MaskMode]]:
    labels = assign_document_labels(DOCS, noise)
    return {s: Counter(labels[d] for d in DOCS[s]) for s in (F, R, A)}


# ---------------------------------------------------------------------------------------------------------------------
# Per document: exact counts


def test_document_recall_and_precision_exact() -> None:
    got = _labels_by_split(NoiseSpec(recall=0.8, precision=0.5))
    assert got[F] == {MaskMode.FORGET: 800, MaskMode.DEFAULT: 200}  # 1 - recall undiscovered
    fp = got[R][MaskMode.FORGET] + got[A][MaskMode.FORGET]
    assert fp == 800  # TP * (1/P - 1)
    # default source: uniformly over retain + adjacent (6000 : 2000)
    assert got[R][MaskMode.FORGET] == pytest.approx(600, abs=45)


def test_document_tpr_fpr_is_corrected() -> None:
    got = _labels_by_split(NoiseSpec(model=NoiseModel.TPR_FPR, tpr=0.9, fpr=0.05))
    assert got[F][MaskMode.FORGET] == 900
    fp_r, fp_a = got[R][MaskMode.FORGET], got[A][MaskMode.FORGET]
    assert fp_r + fp_a == 400  # FPR * N_negatives (8000), not the reference's FPR * TP (45)
    assert fp_r / 6000 == pytest.approx(0.05, abs=0.01) and fp_a / 2000 == pytest.approx(0.05, abs=0.015)


def test_false_positive_sources() -> None:
    first = _labels_by_split(NoiseSpec(precision=0.5, fp_source=FalsePositiveSource.ADJACENT_FIRST))
    assert first[A][MaskMode.FORGET] == 1000 and first[R][MaskMode.FORGET] == 0
    spill = _labels_by_split(NoiseSpec(precision=0.25, fp_source=FalsePositiveSource.ADJACENT_FIRST))
    assert spill[A][MaskMode.FORGET] == 2000 and spill[R][MaskMode.FORGET] == 1000  # 3000 FPs: adjacent, then retain
    only = _labels_by_split(NoiseSpec(precision=0.25, fp_source=FalsePositiveSource.ADJACENT_ONLY))
    assert only[A][MaskMode.FORGET] == 2000 and only[R][MaskMode.FORGET] == 0  # the reference: saturates


def test_document_retain_mode_fractions_and_seed() -> None:
    noise = NoiseSpec(recall=0.5, forget_retain_frac=0.2, retain_retain_frac=0.1, adjacent_retain_frac=0.25)
    got = _labels_by_split(noise)
    assert got[F] == {MaskMode.DEFAULT: 500, MaskMode.FORGET: 400, MaskMode.RETAIN: 100}
    assert got[R] == {MaskMode.DEFAULT: 5400, MaskMode.RETAIN: 600}
    assert got[A] == {MaskMode.DEFAULT: 1500, MaskMode.RETAIN: 500}
    assert assign_document_labels(DOCS, noise) == assign_document_labels(DOCS, noise)
    other = assign_document_labels(DOCS, NoiseSpec(recall=0.5, seed=1))
    assert other != assign_document_labels(DOCS, NoiseSpec(recall=0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Per batch: rates in steps


def _batch_plan(noise: NoiseSpec, steps: int = 30_000, filter: FilterSpec | None = None):  # noqa: ANN202
    pools = {"forget": PoolInfo(F, None, 1000), "retain": PoolInfo(R, None, 6000), "adjacent": PoolInfo(A, None, 2000)}
    return build_plan(pools, steps, upsample=UP, noise=noise, filter=filter or FilterSpec(), seed=0)


def _modes(plan, split: Split) -> Counter[MaskMode]:  # noqa: ANN001
    return Counter(s.mode for s in plan if s.split == split and not s.skip)


def test_batch_precision_recall_rates() -> None:
    plan = _batch_plan(NoiseSpec(granularity=NoiseGranularity.BATCH, recall=0.8, precision=0.5,
                                 retain_retain_frac=0.1))
    f, r, a = _modes(plan, F), _modes(plan, R), _modes(plan, A)
    n_f = sum(f.values())
    assert n_f / len(plan) == pytest.approx(1000 / 9000, abs=0.01)
    assert f[MaskMode.DEFAULT] / n_f == pytest.approx(0.2, abs=0.02)  # p_FN = 1 - recall
    fp = r[MaskMode.FORGET] + a[MaskMode.FORGET]
    assert fp / f[MaskMode.FORGET] == pytest.approx(1.0, abs=0.1)  # FP = TP * (1/P - 1)
    non_fp_retain = sum(r.values()) - r[MaskMode.FORGET]
    assert r[MaskMode.RETAIN] / non_fp_retain == pytest.approx(0.1, abs=0.015)


def test_batch_tpr_fpr_rates_are_corrected() -> None:
    plan = _batch_plan(NoiseSpec(granularity=NoiseGranularity.BATCH, model=NoiseModel.TPR_FPR, tpr=0.9, fpr=0.05))
    r, a = _modes(plan, R), _modes(plan, A)
    assert r[MaskMode.FORGET] / sum(r.values()) == pytest.approx(0.05, abs=0.01)  # FPR of retain steps too
    assert a[MaskMode.FORGET] / sum(a.values()) == pytest.approx(0.05, abs=0.015)
    assert plan.rates is not None and plan.rates.false_negative == pytest.approx(0.1)


def test_step_rates_reference_mode() -> None:
    rates = step_rates(NoiseSpec(precision=0.5, fp_source=FalsePositiveSource.ADJACENT_ONLY), {F: 100, R: 900, A: 50})
    assert rates.fp_adjacent == 1.0 and rates.fp_retain == 0.0  # 100 FPs asked, 50 adjacent steps: saturated
    rates = step_rates(NoiseSpec(precision=0.5), {F: 100, R: 900, A: 100})
    assert rates.fp_adjacent == rates.fp_retain == pytest.approx(0.1)


def test_draw_mode_branches() -> None:
    rates = step_rates(NoiseSpec(recall=0.0), {F: 10, R: 10})
    rng = random.Random(0)
    assert {draw_mode(F, rates, rng) for _ in range(100)} == {MaskMode.DEFAULT}
    rates = step_rates(NoiseSpec(retain_retain_frac=1.0), {F: 10, R: 10})
    assert {draw_mode(R, rates, rng) for _ in range(100)} == {MaskMode.RETAIN}
    assert {draw_mode(F, rates, rng) for _ in range(100)} == {MaskMode.FORGET}


def test_document_noise_steps_follow_pools() -> None:
    noise = NoiseSpec(recall=0.9, precision=0.9)
    labels = assign_document_labels(DOCS, noise)
    counts = Counter((s, labels[d]) for s in (F, R, A) for d in DOCS[s])
    pools = {f"{s.value}/{m.value}": PoolInfo(s, m, n) for (s, m), n in counts.items()}  # one example per document
    plan = build_plan(pools, 20_000, upsample=UP, noise=noise, filter=FilterSpec(), seed=0)
    conf = plan.counts()["label_confusion_steps"]
    assert conf["forget"]["default"] / (conf["forget"]["default"] + conf["forget"]["forget"]) == pytest.approx(
        0.1, abs=0.015)
    assert all(s.mode == pools[s.pool].mode for s in plan)
