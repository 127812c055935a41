"""Sweep report figures: the retain/forget trade-off, final losses against the undiscovered-forget rate, and the
fine-tuning attack; each drawn only when the records carry its data (records as in `sgtm_engine.report`).

Each figure has a `*_figure(records)` function that returns the matplotlib Figure (tests inspect its axes);
`write_figures` saves the ones that apply. Torch-free, matplotlib with the Agg backend (no display on servers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sgtm_engine.mlflow_keys import VIEWS  # noqa: E402
from sgtm_engine.report import (  # noqa: E402
    Group,
    Stat,
    attack_curve,
    final_metrics,
    group_cells,
    group_label,
    mean_std,
    stages_of,
    tradeoff_curve,
)

RECALL = "train.noise.recall"
#: A panel's view, said in full: a figure shows ablated and calibrated panels side by side.
VIEW_TITLES = {**VIEWS, "eval_ablated": "ablated, uncalibrated"}


def align_curves(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[Stat]]:
    """Per x over the union of the curves' x values: the statistics of the curves that have a point there."""
    xs = sorted({float(x) for curve in curves for x, _ in curve})
    by_x: dict[float, list[float]] = {x: [] for x in xs}
    for curve in curves:
        for x, y in curve:
            by_x[float(x)].append(y)
    return xs, [mean_std(by_x[x]) for x in xs]


def plot_band(ax: Any, curves: Sequence[Sequence[tuple[float, float]]], label: str, **line_kw: Any) -> Any:
    """Mean over the curves with a ±1 sample-std band (no band where only one curve has a point); returns the line."""
    xs, stats = align_curves(curves)
    keep = [(x, s) for x, s in zip(xs, stats, strict=True) if s.mean is not None]
    x = np.array([k[0] for k in keep])
    mean = np.array([k[1].mean for k in keep], dtype=float)
    std = np.array([k[1].std or 0.0 for k in keep], dtype=float)
    (line,) = ax.plot(x, mean, label=label, **line_kw)
    if len(curves) > 1:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def _view_for_uncalibrated(views: Iterable[str]) -> str | None:
    present = set(views)
    return "eval_ablated" if "eval_ablated" in present else ("eval" if "eval" in present else None)


def tradeoff_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Retain vs forget loss across training checkpoints, a line per variant (mean over seeds per checkpoint; the
    final checkpoint a star). Columns: ablated-uncalibrated and calibrated views (those present); rows: grid points."""
    groups = [g for g in group_cells(records) if g.ok]
    present = {v for g in groups for c in g.ok for v in VIEWS if tradeoff_curve(c, v)}
    views = [v for v in (_view_for_uncalibrated(present), "eval_calibrated") if v in present]
    if not views:
        return None
    points: dict[str, list[Group]] = {}  # grid point -> its groups, one per variant
    for g in groups:
        points.setdefault(json.dumps(g.params, sort_keys=True, default=str), []).append(g)
    fig, axes = plt.subplots(len(points), len(views), figsize=(max(5.5 * len(views), 7.0), 4.2 * len(points)),
                             squeeze=False, layout="constrained")  # constrained: the suptitle gets its own space
    colors = _colors(groups)
    for row, mine in enumerate(points.values()):
        params = group_label("", mine[0].params).strip()
        for col, view in enumerate(views):
            ax = axes[row][col]
            for g in mine:
                curves = [tradeoff_curve(c, view) for c in g.ok]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                _, retain = align_curves([[(s, r) for s, r, _ in c] for c in curves])
                _, forget = align_curves([[(s, f) for s, _, f in c] for c in curves])
                x = [s.mean for s in retain]
                y = [s.mean for s in forget]
                ax.plot(x, y, marker="o", ms=3, lw=1.2, color=colors[g.variant], label=g.variant)
                ax.plot(x[-1:], y[-1:], marker="*", ms=12, color=colors[g.variant], linestyle="none")
            _label(ax, "retain loss (nats/token)", "forget loss (nats/token)", f"{VIEW_TITLES[view]} {params}".strip())
    fig.suptitle("Retain vs forget loss across checkpoints (mean over seeds; ★ = final)")
    return fig


def undiscovered_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Final retain and forget loss against the undiscovered-forget rate 1 - recall (percent, symlog x), mean ± std
    error bars per variant; a row per view (calibrated, then ablated-uncalibrated)."""
    groups = [g for g in group_cells(records) if g.ok and RECALL in g.params]
    if len({g.params[RECALL] for g in groups}) < 2:
        return None
    # one series per variant and per value of the other grid axes
    series: dict[str, list[Group]] = {}
    for g in groups:
        others = {k: v for k, v in g.params.items() if k != RECALL}
        series.setdefault(group_label(g.variant, others), []).append(g)
    present = {k.split("/")[0] for g in groups for c in g.ok for k in final_metrics(c)}
    views = [v for v in ("eval_calibrated", _view_for_uncalibrated(present)) if v in present]
    if not views:
        return None
    fig, axes = plt.subplots(len(views), 2, figsize=(11, 4.2 * len(views)), squeeze=False, layout="constrained")
    colors = _colors(groups)
    rates = sorted({_undiscovered(g.params[RECALL]) for g in groups})
    for row, view in enumerate(views):
        for col, split in enumerate(("retain", "forget")):
            ax = axes[row][col]
            for label, mine in series.items():
                mine = sorted(mine, key=lambda g: _undiscovered(g.params[RECALL]))
                stats = [mean_std(final_metrics(c).get(f"{view}/{split}/loss") for c in g.ok) for g in mine]
                pts = [(_undiscovered(g.params[RECALL]), s) for g, s in zip(mine, stats, strict=True) if s.n]
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0.0 for p in pts],
                            marker="o", ms=4, capsize=3, lw=1.2, label=label, color=colors[mine[0].variant])
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xticks(rates)
            ax.set_xticklabels([f"{r:g}%" for r in rates])
            _label(ax, "undiscovered forget data (1 − recall, %)", f"{split} loss (nats/token)",
                   f"final {split} loss, {VIEW_TITLES[view]}")
    fig.suptitle("Final losses against the undiscovered-forget rate (mean ± sample std over seeds)")
    return fig


def _undiscovered(recall: Any) -> float:
    return round(100.0 * (1.0 - float(recall)), 6)


def attack_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Left: held-out forget loss minus the same seed's reference (<= 0 is recovered) against attack step, mean ± std
    band over seeds per variant. Middle: retain loss during the attack. Right: steps to recovery per variant (mean ±
    std over the seeds that recovered; hatched at the attack length when none did), annotated with k/n recovered."""
    groups = [g for g in group_cells(records) if any(stages_of(c, "attack") for c in g.ok)]
    if not groups:
        return None
    names = list(dict.fromkeys(n for g in groups for c in g.ok for n, _ in stages_of(c, "attack")))
    fig, (ax_c, ax_r, ax_b) = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
    bars: list[tuple[str, Stat, int, int, float]] = []
    for g in groups:
        for name in names:
            results = [r for c in g.ok for n, r in stages_of(c, "attack") if n == name]
            if not results:
                continue
            label = g.label if len(names) == 1 else f"{g.label} [{name}]"
            summaries = [r.get("summary") or {} for r in results]
            gaps = [[(x, y - (s.get("reference_forget_loss") or 0.0)) for x, y in attack_curve(r)]
                    for r, s in zip(results, summaries, strict=True)]
            plot_band(ax_c, gaps, label, lw=1.5)
            plot_band(ax_r, [attack_curve(r, "retain/loss") for r in results], label, lw=1.5)
            steps = [s.get("steps_to_recovery") for s in summaries]
            length = max(float(s.get("steps") or 0) for s in summaries)
            bars.append((label, mean_std(steps), sum(x is not None for x in steps), len(steps), length))
    ax_c.axhline(0.0, color="black", ls="--", lw=1, label="reference (the baseline, same seed)")
    _label(ax_c, "attack step", "forget loss − reference (nats/token, held-out, uncalibrated)", "recovery curves")
    _label(ax_r, "attack step", "retain loss (nats/token)", "retain loss during the attack")
    xs = np.arange(len(bars))
    heights = [b[1].mean if b[1].mean is not None else b[4] for b in bars]
    errs = [b[1].std or 0.0 for b in bars]
    drawn = ax_b.bar(xs, heights, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    for patch, (_, stat, k, n, _) in zip(drawn.patches, bars, strict=True):
        if stat.mean is None:  # nobody recovered: a hatched bar at the attack length, a lower bound
            patch.set_hatch("//")
            patch.set_facecolor("white")
            patch.set_edgecolor("tab:blue")
        ax_b.annotate(f"{k}/{n}", (patch.get_x() + patch.get_width() / 2, patch.get_height()),
                      ha="center", va="bottom", fontsize=8)
    ax_b.set_xticks(xs)
    ax_b.set_xticklabels([b[0] for b in bars], rotation=30, ha="right", fontsize=7)
    ax_b.set_ylabel("attack steps to recover the reference")
    ax_b.set_title("steps to recovery (k/n recovered; hatched: none did)")
    ax_b.grid(alpha=0.3, axis="y")
    fig.suptitle("Fine-tuning attack (mean ± sample std over seeds)")
    return fig


def _label(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and a small legend: every line panel of the report looks alike."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _colors(groups: Sequence[Group]) -> dict[str, Any]:
    """One colour per variant across every panel and figure."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(g.variant for g in groups))
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


FIGURES: dict[str, Callable[[Sequence[Mapping[str, Any]]], Figure | None]] = {
    "tradeoff": tradeoff_figure, "undiscovered_rate": undiscovered_figure, "attack": attack_figure}


def write_figures(records: Sequence[Mapping[str, Any]], outdir: Path) -> dict[str, str]:
    """Every figure the records carry data for, as `<outdir>/<name>.png`; returns {name: file name} (relative to
    `outdir`, so a report folder that moves keeps its links)."""
    out = {}
    for name, make in FIGURES.items():
        fig = make(records)
        if fig is not None:
            fig.savefig(outdir / f"{name}.png", dpi=110)
            plt.close(fig)
            out[name] = f"{name}.png"
    return out
