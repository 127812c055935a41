"""Sweep reports: tables aggregated over seeds and the paper's figures, built from the cells' stage results.

Input: one record per cell, `{"cell_id", "variant", "params": {dotted path: value}, "seed", "status",
"stages": {stage name: the stage's result dict, as `pipeline.run_stage` returns it}}`. The service builds the records
from its ledger; `python -m sgtm_engine.report RUNS_DIR --out DIR` builds them from folders of `result.json` files.

Choices made here:
- Torch-free (stdlib, numpy, matplotlib with the Agg backend): the API imports this module.
- Cells are grouped by (variant, grid params) and aggregated over seeds: mean, sample standard deviation (ddof = 1;
  None when n = 1, because one seed says nothing about spread) and n. Only succeeded cells enter the statistics;
  failed, cancelled and unfinished cells are counted and listed per group, never averaged in. A succeeded cell that
  lacks a metric simply does not count towards that metric's n (n is per metric).
- Final metrics come from the stage named `evaluate` (else the first evaluate stage, else the train stage's final
  evaluation): split loss and accuracy of the unablated (`eval`), ablated (`eval_ablated`) and calibrated
  (`eval_calibrated`) views, and the capability metrics (target-language share, cloze accuracy).
- The method's training run is the stage named `train` (else the first train stage); its evaluation history gives
  the trade-off across checkpoints.
- Attack stages: steps and forget tokens to recovery are averaged over the seeds that recovered, next to the
  recovered fraction (k/n), as in the attack matrix; "not recovered within N steps" when none did.
- Every figure is drawn only when the records carry its data, and each has a `*_figure(records)` function that
  returns the matplotlib Figure (tests inspect its axes).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sgtm_engine.mlflow_keys import metric_key  # noqa: E402

SUCCEEDED = "succeeded"
RECALL = "train.noise.recall"
VIEWS = ("eval", "eval_ablated", "eval_calibrated")
VIEW_TITLES = {"eval": "unablated", "eval_ablated": "ablated, uncalibrated", "eval_calibrated": "calibrated"}
_FINAL_KEY = re.compile(r"^(eval|eval_ablated|eval_calibrated)/((retain|forget|adjacent)/(loss|acc)|capability/[^/]+)$")

# ---------------------------------------------------------------------------------------------------------------------
# Aggregation (shared with the attack matrix)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None for n < 2) and count of one metric over seeds."""

    mean: float | None
    std: float | None
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def mean_std(values: Iterable[float | None]) -> Stat:
    """Mean and sample std (ddof = 1) of the finite values; None and NaN are left out (and not counted)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Stat(None, None, 0)
    arr = np.asarray(xs, dtype=float)
    return Stat(float(arr.mean()), float(arr.std(ddof=1)) if len(xs) > 1 else None, len(xs))


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


def format_stat(stat: Stat | Mapping[str, Any] | None, fmt: str = ".3f", with_n: bool = True) -> str:
    """`6.053 ± 0.012 (n=3)`; the std is left out when undefined, `–` when there is no value."""
    if isinstance(stat, Mapping):
        stat = Stat(stat.get("mean"), stat.get("std"), int(stat.get("n", 0)))
    if stat is None or stat.mean is None:
        return "–"
    text = f"{stat.mean:{fmt}}"
    if stat.std is not None:
        text += f" ± {stat.std:{fmt.replace('+', '')}}"
    return f"{text} (n={stat.n})" if with_n else text


# ---------------------------------------------------------------------------------------------------------------------
# Reading one cell's stage results


def _stage_kind(name: str, result: Mapping[str, Any]) -> str:
    return str(result.get("kind") or name)


def _stages_of(record: Mapping[str, Any], kind: str) -> list[tuple[str, Mapping[str, Any]]]:
    stages = record.get("stages") or {}
    return [(n, r) for n, r in stages.items() if isinstance(r, Mapping) and _stage_kind(n, r) == kind]


def _preferred(record: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The stage named like its kind, else the first stage of that kind."""
    found = _stages_of(record, kind)
    named = [r for n, r in found if n == kind]
    return named[0] if named else (found[0][1] if found else None)


def train_result(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return _preferred(record, "train")


def final_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Split losses and accuracies per view, and capability metrics, of the cell's final model."""
    source = _preferred(record, "evaluate") or train_result(record) or {}
    metrics = source.get("metrics") or {}
    return {k: float(v) for k, v in metrics.items() if _FINAL_KEY.match(k) and v is not None}


def attack_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """`<attack stage>/steps_to_recovery` (None if not recovered), `/recovered` (0/1), `/forget_tokens_to_recovery`,
    `/start_forget_loss`, `/end_forget_loss`, `/reference_forget_loss`, `/attack_steps` per attack stage."""
    out: dict[str, float | None] = {}
    for name, res in _stages_of(record, "attack"):
        summary = res.get("summary") or {}
        curve = attack_curve(res)
        out[f"{name}/steps_to_recovery"] = summary.get("steps_to_recovery")
        out[f"{name}/recovered"] = 1.0 if summary.get("steps_to_recovery") is not None else 0.0
        out[f"{name}/forget_tokens_to_recovery"] = summary.get("forget_tokens_to_recovery")
        out[f"{name}/start_forget_loss"] = curve[0][1] if curve else None
        out[f"{name}/end_forget_loss"] = curve[-1][1] if curve else None
        out[f"{name}/reference_forget_loss"] = summary.get("reference_forget_loss")
        out[f"{name}/attack_steps"] = summary.get("steps")
    return out


def attack_curve(result: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(attack step, held-out forget loss) per evaluation of an attack stage."""
    key = (result.get("summary") or {}).get("curve_key", "forget/loss")
    return [(float(h["step"]), float(h["metrics"][key])) for h in result.get("history") or []
            if h.get("metrics", {}).get(key) is not None]


def tradeoff_curve(record: Mapping[str, Any], view: str) -> list[tuple[float, float, float]]:
    """(step, retain loss, forget loss) per evaluation along training, in one view."""
    train = train_result(record) or {}
    out = []
    for h in train.get("history") or []:
        m = h.get("metrics") or {}
        r, f = m.get(f"{view}/retain/loss"), m.get(f"{view}/forget/loss")
        if r is not None and f is not None:
            out.append((float(h["step"]), float(r), float(f)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Groups and tables


@dataclass
class Group:
    """The cells of one (variant, grid params) combination."""

    variant: str
    params: dict[str, Any]
    cells: list[Mapping[str, Any]]

    @property
    def ok(self) -> list[Mapping[str, Any]]:
        return [c for c in self.cells if c.get("status") == SUCCEEDED]

    @property
    def label(self) -> str:
        return group_label(self.variant, self.params)


def _variant(record: Mapping[str, Any]) -> str:
    if record.get("variant"):
        return str(record["variant"])
    train = train_result(record)
    return str(train.get("method")) if train and train.get("method") else "default"


def group_label(variant: str, params: Mapping[str, Any]) -> str:
    """`sgtm (recall=0.99)`: the variant and the last component of each grid path."""
    if not params:
        return variant
    return f"{variant} ({', '.join(f'{_leaf(k)}={v}' for k, v in params.items())})"


def _leaf(dotted: str) -> str:
    return dotted.rsplit(".", 1)[-1]


def group_cells(records: Sequence[Mapping[str, Any]]) -> list[Group]:
    """Groups in order of first appearance (the sweep's cell order), seeds inside."""
    groups: dict[tuple[str, str], Group] = {}
    for rec in records:
        params = dict(rec.get("params") or {})
        key = (_variant(rec), json.dumps(params, sort_keys=True, default=str))
        groups.setdefault(key, Group(key[0], params, [])).cells.append(rec)
    return list(groups.values())


def _stats(cells: Sequence[Mapping[str, Any]], extract: Callable[[Mapping[str, Any]], Mapping[str, Any]]
           ) -> dict[str, Stat]:
    per_cell = [extract(c) for c in cells]
    keys = sorted({k for m in per_cell for k in m})
    return {k: mean_std(m.get(k) for m in per_cell) for k in keys}


def _row(group: Group, stats: Mapping[str, Stat]) -> dict[str, Any]:
    bad = [c for c in group.cells if c.get("status") != SUCCEEDED]
    return {"variant": group.variant, "params": group.params, "label": group.label,
            "n_cells": len(group.cells), "n_succeeded": len(group.ok), "n_failed": len(bad),
            "seeds": sorted(c.get("seed") for c in group.ok if c.get("seed") is not None),
            "missing": [{"cell_id": c.get("cell_id"), "seed": c.get("seed"), "status": c.get("status")} for c in bad],
            "stats": {k: s.as_dict() for k, s in stats.items()}}


def tables(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """The `final` table (every group) and the `attack` table (groups with attack stages)."""
    final_rows = [_row(g, _stats(g.ok, final_metrics)) for g in groups]
    attack_rows = [_row(g, _stats(g.ok, attack_metrics)) for g in groups]
    attack_rows = [r for r in attack_rows if r["stats"]]
    out = [{"name": "final", "title": "Final model, mean ± sample std over seeds",
            "columns": sorted({k for r in final_rows for k in r["stats"]}), "rows": final_rows}]
    if attack_rows:
        out.append({"name": "attack", "title": "Fine-tuning attack, mean ± sample std over seeds "
                                               "(steps and tokens: over the seeds that recovered)",
                    "columns": sorted({k for r in attack_rows for k in r["stats"]}), "rows": attack_rows})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Figures


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
    points = list(dict.fromkeys(json.dumps(g.params, sort_keys=True, default=str) for g in groups))
    fig, axes = plt.subplots(len(points), len(views), figsize=(5.5 * len(views), 4.2 * len(points)), squeeze=False,
                             layout="constrained")  # constrained: the suptitle gets its own space
    colors = _colors(groups)
    for row, point in enumerate(points):
        for col, view in enumerate(views):
            ax = axes[row][col]
            for g in groups:
                if json.dumps(g.params, sort_keys=True, default=str) != point:
                    continue
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
            params = group_label("", json.loads(point)).strip()
            ax.set_title(f"{VIEW_TITLES[view]} {params}".strip())
            ax.set_xlabel("retain loss (nats/token)")
            ax.set_ylabel("forget loss (nats/token)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
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
            ax.set_xlabel("undiscovered forget data (1 − recall, %)")
            ax.set_ylabel(f"{split} loss (nats/token)")
            ax.set_title(f"final {split} loss, {VIEW_TITLES[view]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Final losses against the undiscovered-forget rate (mean ± sample std over seeds)")
    return fig


def _undiscovered(recall: Any) -> float:
    return round(100.0 * (1.0 - float(recall)), 6)


def attack_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Left: held-out forget loss against attack step (mean ± std band over seeds) per variant, with the reference
    (dashed). Right: steps to recovery per variant (mean ± std over the seeds that recovered; hatched at the attack
    length when none did), annotated with k/n recovered."""
    groups = [g for g in group_cells(records) if any(_stages_of(c, "attack") for c in g.ok)]
    if not groups:
        return None
    names = list(dict.fromkeys(n for g in groups for c in g.ok for n, _ in _stages_of(c, "attack")))
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    refs: list[float] = []
    bars: list[tuple[str, Stat, int, int, float]] = []
    for g in groups:
        for name in names:
            results = [r for c in g.ok for n, r in _stages_of(c, "attack") if n == name]
            if not results:
                continue
            label = g.label if len(names) == 1 else f"{g.label} [{name}]"
            plot_band(ax_c, [attack_curve(r) for r in results], label, lw=1.5)
            summaries = [r.get("summary") or {} for r in results]
            refs += [s["reference_forget_loss"] for s in summaries if s.get("reference_forget_loss") is not None]
            steps = [s.get("steps_to_recovery") for s in summaries]
            length = max(float(s.get("steps") or 0) for s in summaries)
            bars.append((label, mean_std(steps), sum(x is not None for x in steps), len(steps), length))
    if refs:
        ax_c.axhline(float(np.mean(refs)), color="black", ls="--", lw=1, label="reference (no filter)")
    ax_c.set_xlabel("attack step")
    ax_c.set_ylabel("forget loss (nats/token, held-out, uncalibrated)")
    ax_c.set_title("recovery curves")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=7)
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
    ax_b.set_title("steps to recovery (k/n seeds recovered; hatched: not recovered)")
    ax_b.grid(alpha=0.3, axis="y")
    fig.suptitle("Fine-tuning attack (mean ± sample std over seeds)")
    return fig


def _colors(groups: Sequence[Group]) -> dict[str, Any]:
    """One colour per variant across every panel and figure."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = list(dict.fromkeys(g.variant for g in groups))
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


FIGURES: dict[str, Callable[[Sequence[Mapping[str, Any]]], Figure | None]] = {
    "tradeoff": tradeoff_figure, "undiscovered_rate": undiscovered_figure, "attack": attack_figure}


# ---------------------------------------------------------------------------------------------------------------------
# The report


def build_report(records: Sequence[Mapping[str, Any]], outdir: Path | None = None) -> dict[str, Any]:
    """Aggregate a sweep's cells and, with `outdir`, write its figures (PNG), `report.md` and `report.json`.

    Args:
        records: one per cell: `{"cell_id", "variant", "params", "seed", "status", "stages": {name: result}}`.
        outdir: where to write the files; None computes the tables and metrics only.

    Returns:
        `{"tables", "figures": {name: path}, "metrics": {flat MLflow-safe aggregates}, "n_cells", "n_succeeded",
        "n_failed", "statuses": {status: count}}`.
    """
    groups = group_cells(records)
    statuses: dict[str, int] = {}
    for rec in records:
        statuses[str(rec.get("status"))] = statuses.get(str(rec.get("status")), 0) + 1
    n_ok = statuses.get(SUCCEEDED, 0)
    report: dict[str, Any] = {"n_cells": len(records), "n_succeeded": n_ok, "n_failed": len(records) - n_ok,
                              "statuses": statuses, "tables": tables(groups), "figures": {}}
    report["metrics"] = flat_metrics(report)
    if outdir is not None:
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for name, make in FIGURES.items():
            fig = make(records)
            if fig is None:
                continue
            path = outdir / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            report["figures"][name] = str(path)
        (outdir / "report.md").write_text(report_markdown(report))
        (outdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """`<group>/<metric>/{mean,std}` and `<group>/n_succeeded` for the sweep's MLflow parent run (MLflow-safe
    keys; the per-metric n stays in report.json, which keeps a 45-cell sweep under a thousand metrics)."""
    out: dict[str, float] = {"sweep/n_cells": float(report["n_cells"]),
                             "sweep/n_succeeded": float(report["n_succeeded"]),
                             "sweep/n_failed": float(report["n_failed"])}
    seen: set[tuple[str, str]] = set()
    for table in report["tables"]:
        for row in table["rows"]:
            params = "/".join(f"{_leaf(k)}_{v}" for k, v in row["params"].items())
            prefix = "/".join(p for p in (row["variant"], params) if p)
            out[metric_key(f"{prefix}/n_succeeded")] = float(row["n_succeeded"])
            for metric, stat in row["stats"].items():
                if (prefix, metric) in seen:
                    continue
                seen.add((prefix, metric))
                for field in ("mean", "std"):
                    if stat[field] is not None:
                        out[metric_key(f"{prefix}/{metric}/{field}")] = float(stat[field])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Markdown

#: The final table's markdown columns, in this order, when present (everything else is in report.json).
_MD_FINAL = [(f"{view}/{split}/loss", f"{split} loss ({short})")
             for view, short in (("eval_calibrated", "cal."), ("eval_ablated", "abl."), ("eval", "unabl."))
             for split in ("retain", "forget", "adjacent")]
_MD_ATTACK_TAIL = ("recovered", "steps_to_recovery", "forget_tokens_to_recovery", "start_forget_loss",
                   "end_forget_loss")


def _md_columns(columns: Sequence[str]) -> list[tuple[str, str]]:
    chosen = [(k, h) for k, h in _MD_FINAL if k in columns]
    for view, short in (("eval_calibrated", "cal."), ("eval", "unabl.")):
        chosen += [(k, f"{k.rsplit('/', 1)[-1]} ({short})") for k in columns if k.startswith(f"{view}/capability/")]
    return chosen


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report's tables as markdown (the `final` table's main columns, the attack table), with cell counts."""
    others = ", ".join(f"{v} {k}" for k, v in sorted(report.get("statuses", {}).items()) if k != SUCCEEDED)
    lines = [f"Cells: {report['n_cells']}, {report['n_succeeded']} succeeded" + (f", {others}" if others else "")
             + ". Statistics are over the succeeded cells only: mean ± sample std (n = seeds with the value).", ""]
    for table in report["tables"]:
        if table["name"] == "final":
            cols = _md_columns(table["columns"])
        else:
            stages = list(dict.fromkeys(k.split("/")[0] for k in table["columns"]))
            cols = [(f"{st}/{m}", f"{st} {m.replace('_', ' ')}") for st in stages for m in _MD_ATTACK_TAIL
                    if f"{st}/{m}" in table["columns"]]
        lines += [f"### {table['title']}", "", "| group | cells ok | " + " | ".join(h for _, h in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in table["rows"]:
            cells = []
            for key, _ in cols:
                stat = row["stats"].get(key)
                if key.endswith("/recovered") and stat and stat["mean"] is not None:
                    cells.append(f"{round(stat['mean'] * stat['n'])}/{stat['n']}")
                elif key.endswith("tokens_to_recovery"):
                    cells.append(format_stat(stat, ",.0f"))
                elif key.endswith("steps_to_recovery") and (stat is None or stat["mean"] is None):
                    steps = row["stats"].get(key.replace("steps_to_recovery", "attack_steps"))
                    cells.append(f"not recovered within {steps['mean']:.0f} steps" if steps and steps["mean"]
                                 else "–")
                elif key.endswith("steps_to_recovery"):
                    cells.append(format_stat(stat, ".0f"))
                else:
                    cells.append(format_stat(stat))
            lines.append(f"| {row['label']} | {row['n_succeeded']}/{row['n_cells']} | " + " | ".join(cells) + " |")
        lines.append("")
    missing = [(row["label"], m) for row in report["tables"][0]["rows"] for m in row["missing"]] \
        if report["tables"] else []
    if missing:
        lines.append("Cells left out of the statistics:")
        lines += [f"- {label}, seed {m['seed']}: {m['status']} (cell {m['cell_id']})" for label, m in missing]
        lines.append("")
    if report.get("figures"):
        lines += [f"![{name}]({Path(path).name})" for name, path in report["figures"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Local use: a directory of pipeline workdirs


def load_runs(runs_dir: Path, params: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records from `RUNS_DIR/<cell>/<stage>/result.json` (what `sgtm run --workdir` writes per cell).

    A cell folder may hold a `cell.json` with `variant`, `params`, `seed`, `cell_id`; without one, the variant is the
    train stage's method, the seed its seed, and each dotted path in `params` (`train.noise.recall`) is read from
    that stage's resolved spec. A cell is `succeeded` when every stage folder holds a result.json, else `failed`.
    """
    records = []
    for cell_dir in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        stages, complete = {}, True
        for stage_dir in sorted(p for p in cell_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            result = stage_dir / "result.json"
            if result.exists():
                stages[stage_dir.name] = json.loads(result.read_text())
            elif (stage_dir / "events.jsonl").exists():
                complete = False
        if not stages:
            continue
        meta = json.loads((cell_dir / "cell.json").read_text()) if (cell_dir / "cell.json").exists() else {}
        rec = {"cell_id": meta.get("cell_id", cell_dir.name), "variant": meta.get("variant"),
               "params": meta.get("params"), "seed": meta.get("seed"),
               "status": meta.get("status", SUCCEEDED if complete else "failed"), "stages": stages}
        train = train_result(rec) or {}
        rec["variant"] = _variant(rec)
        if rec["seed"] is None:
            rec["seed"] = train.get("seed")
        if rec["params"] is None:
            rec["params"] = {p: _resolved(rec, p) for p in params}
        records.append(rec)
    return records


def _resolved(record: Mapping[str, Any], dotted: str) -> Any:
    stage, *path = dotted.split(".")
    node: Any = (record["stages"].get(stage) or {}).get("resolved_spec") or {}
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgtm_engine.report",
                                     description="Build a sweep report from a directory of cell workdirs.")
    parser.add_argument("runs_dir", type=Path, help="a folder of cell folders, each holding <stage>/result.json")
    parser.add_argument("--out", type=Path, required=True, help="where report.md, report.json and the PNGs go")
    parser.add_argument("--param", action="append", default=[],
                        help="a grid path read from each cell's resolved spec when it has no cell.json, "
                             "e.g. train.noise.recall (repeatable)")
    args = parser.parse_args(argv)
    report = build_report(load_runs(args.runs_dir, args.param), args.out)
    print(report_markdown(report))  # noqa: T201 - a command-line entry
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
