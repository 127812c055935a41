"""Sweep reports: tables aggregated over seeds, and the paper's figures (report_figures), built from the cells'
stage results.

Input: one record per cell, `{"cell_id", "variant", "params": {dotted path: value}, "seed", "status", "stages":
{stage name: the stage's result dict, as `stage.run_stage` returns it}}`, which the service builds from its ledger
and `sgtm sweep --local` from its run folder. Torch-free (stdlib; matplotlib only when figures are written): the API
imports this module. How cells are grouped, which stages and metrics are read and how seeds are aggregated is user
documentation: docs/sweeps.md, "The report".
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgtm_engine.config import Split
from sgtm_engine.mlflow_keys import VIEWS, headline_columns, metric_key

SUCCEEDED = "succeeded"
_FINAL_KEY = re.compile(rf"^({'|'.join(VIEWS)})/(({'|'.join(Split)})/(loss|acc)|capability/[^/]+)$")

# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None for n < 2) and count of one metric over seeds."""

    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[float | None]) -> Stat:
    """Mean and sample std (ddof = 1) of the finite values; None and NaN are left out (and not counted)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return Stat(statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


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


def stages_of(record: Mapping[str, Any], kind: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The cell's stage results of `kind` (a result without its kind: the stage named like it)."""
    stages = record.get("stages") or {}
    return [(n, r) for n, r in stages.items() if isinstance(r, Mapping) and (r.get("kind") or n) == kind]


def _preferred(record: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The stage named like its kind, else the first stage of that kind."""
    found = stages_of(record, kind)
    named = [r for n, r in found if n == kind]
    return named[0] if named else (found[0][1] if found else None)


def train_result(record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return _preferred(record, "train")


def final_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Split losses and accuracies per view, and capability metrics, of the cell's final model."""
    source = _preferred(record, "evaluate") or train_result(record) or {}
    metrics = source.get("metrics") or {}
    return {k: float(v) for k, v in metrics.items() if _FINAL_KEY.match(k) and v is not None}


#: The fields of an attack stage's summary (`recovery.Recovery`'s, and the stage's own) that the report aggregates.
ATTACK_FIELDS = ("steps_to_recovery", "forget_tokens_to_recovery", "start_forget_loss", "end_forget_loss",
                  "start_retain_loss", "end_gap", "mean_excess_forget_loss", "reference_forget_loss", "steps")


def attack_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """Per attack stage: `<stage>/<field>` of its summary as the stage recorded it (None where it did not, e.g. the
    steps to recovery of an attack that did not recover), `<stage>/recovered` (0/1) and `<stage>/forget_prefix_loss`
    (conditional models' zero-step attack)."""
    out: dict[str, float | None] = {}
    for name, res in stages_of(record, "attack"):
        summary = res.get("summary") or {}
        out.update({f"{name}/{field}": summary.get(field) for field in ATTACK_FIELDS})
        out[f"{name}/recovered"] = 1.0 if summary.get("steps_to_recovery") is not None else 0.0
        out[f"{name}/forget_prefix_loss"] = summary.get("forget_prefix_step0_forget_loss")
    return out


def attack_curve(result: Mapping[str, Any], key: str | None = None) -> list[tuple[float, float]]:
    """(attack step, held-out forget loss, or the metric `key`) per evaluation of an attack stage."""
    key = key or (result.get("summary") or {}).get("curve_key", "forget/loss")
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
    return f"{variant} ({', '.join(_param_terms(params))})" if params else variant


def _param_terms(params: Mapping[str, Any], sep: str = "=") -> list[str]:
    """`recall=0.99` per grid path: its last component and the value."""
    return [f"{k.rsplit('.', 1)[-1]}{sep}{v}" for k, v in params.items()]


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
            "stats": {k: asdict(s) for k, s in stats.items()}}


def tables(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """The `final` table (every group), the `attack` table (groups with attack stages) and, where a method met more
    than one attack configuration, the `attack_worst` table."""
    final_rows = [_row(g, _stats(g.ok, final_metrics)) for g in groups]
    attack_rows = [_row(g, _stats(g.ok, attack_metrics)) for g in groups]
    attack_rows = [r for r in attack_rows if r["stats"]]
    worst_rows = worst_case_rows(attack_rows, attack_axes([c for g in groups for c in g.cells]))
    contents = [("final", "Final model, mean ± sample std over seeds", final_rows),
                ("attack", "Fine-tuning attack, mean ± sample std over seeds (steps and tokens: over the seeds that "
                           "recovered)", attack_rows),
                ("attack_worst", "Fine-tuning attack, the worst case over attack configurations (most seeds "
                                 "recovered, then fewest steps to recovery, then least forget loss above the "
                                 "reference)", worst_rows)]
    return [{"name": name, "title": title, "columns": sorted({k for r in rows for k in r["stats"]}), "rows": rows}
            for name, title, rows in contents if rows or name == "final"]


def attack_axes(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The grid paths that set a field of an attack stage (`attack.optim.lr`): the attack configurations."""
    records = list(records)
    attacks = {name for rec in records for name, _ in stages_of(rec, "attack")}
    return list(dict.fromkeys(p for rec in records for p in rec.get("params") or {} if p.split(".")[0] in attacks))


def worst_case_rows(attack_rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> list[dict[str, Any]]:
    """Per method and setting (the attack table's groups with the attack axes left out), the attack configuration
    (values of the attack axes, and the attack stage where a cell has several) that did best for the attacker, its
    statistics as `worst/<metric>`. Only where there were at least two configurations to choose from."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in attack_rows:
        setting = {k: v for k, v in row["params"].items() if k not in axes}
        config = _param_terms({k: v for k, v in row["params"].items() if k in axes})
        entry = found.setdefault((row["variant"], json.dumps(setting, sort_keys=True, default=str)),
                                 {"variant": row["variant"], "params": setting, "candidates": []})
        stages = list(dict.fromkeys(k.split("/")[0] for k in row["stats"]))
        for stage in stages:
            stats = {k.split("/", 1)[1]: v for k, v in row["stats"].items() if k.startswith(stage + "/")}
            label = ", ".join(config + ([stage] if len(stages) > 1 else [])) or stage
            entry["candidates"].append((label, stats, row))
    out = []
    for entry in found.values():
        if len(entry["candidates"]) < 2:
            continue
        label, stats, row = max(entry["candidates"], key=lambda c: _attacker_gain(c[1]))
        out.append({"variant": entry["variant"], "params": entry["params"],
                    "label": group_label(entry["variant"], entry["params"]), "n_cells": row["n_cells"],
                    "n_succeeded": row["n_succeeded"], "configurations": len(entry["candidates"]), "worst": label,
                    "stats": {f"worst/{k}": v for k, v in stats.items()}})
    return out


def _attacker_gain(stats: Mapping[str, Mapping[str, Any]]) -> tuple[float, float, float]:
    """Orders attack configurations from the defender's best to worst: recovered fraction, then steps to recovery
    (fewer is worse), then the mean forget loss left above the reference (less is worse)."""
    def mean(key: str) -> float | None:
        stat = stats.get(key)
        return stat["mean"] if stat and stat["mean"] is not None else None

    steps, excess = mean("steps_to_recovery"), mean("mean_excess_forget_loss")
    return (mean("recovered") or 0.0, -steps if steps is not None else -math.inf,
            -excess if excess is not None else -math.inf)


# ---------------------------------------------------------------------------------------------------------------------
# The report


def build_report(records: Sequence[Mapping[str, Any]], outdir: Path | None = None) -> dict[str, Any]:
    """Aggregate a sweep's cells and, with `outdir`, write its figures (PNG), `report.md` and `report.json`.

    Args:
        records: one per cell: `{"cell_id", "variant", "params", "seed", "status", "stages": {name: result}}`.
        outdir: where to write the files; None computes the tables and metrics only.

    Returns:
        `{"tables", "figures": {name: file name in outdir}, "metrics": {flat MLflow-safe aggregates}, "n_cells",
        "n_succeeded", "n_failed", "statuses": {status: count}, "provenance": {code_version, torch, device:
        [distinct values]}}`.
    """
    groups = group_cells(records)
    statuses = dict(Counter(str(rec.get("status")) for rec in records))
    n_ok = statuses.get(SUCCEEDED, 0)
    report: dict[str, Any] = {"n_cells": len(records), "n_succeeded": n_ok, "n_failed": len(records) - n_ok,
                              "statuses": statuses, "provenance": provenance(records), "tables": tables(groups),
                              "figures": {}}
    report["metrics"] = sweep_metrics(report)
    if outdir is not None:
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        from sgtm_engine.report_figures import write_figures  # matplotlib only when files are written

        report["figures"] = write_figures(records, outdir)
        (outdir / "report.md").write_text(report_markdown(report))
        # strict JSON: every statistic is finite (`mean_std` leaves NaN out) and params are validated spec values
        (outdir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))
    return report


def report_files(report: Mapping[str, Any], outdir: Path) -> list[Path]:
    """The files `build_report` wrote into `outdir`: report.md, report.json and the figures."""
    return [outdir / "report.md", outdir / "report.json", *(outdir / file for file in report["figures"].values())]


def provenance(records: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """What produced the cells' stage results, each distinct value once: code versions, torch versions and devices
    (`AMD EPYC (AVX512)`, `NVIDIA H200 (CUDA 12.8)`); single-seed numbers differ between machines."""
    found: dict[str, dict[str, None]] = {"code_version": {}, "torch": {}, "device": {}}
    for rec in records:
        for result in (rec.get("stages") or {}).values():
            backends = (result.get("backends") or {}) if isinstance(result, Mapping) else {}
            if not backends:
                continue
            detail = f"CUDA {backends['cuda']}" if backends.get("device", "").startswith("cuda") else \
                backends.get("cpu_capability")
            device = f"{backends.get('device_name') or backends.get('device')}" + (f" ({detail})" if detail else "")
            for key, value in (("code_version", result.get("code_version")), ("torch", backends.get("torch")),
                               ("device", device)):
                if value:
                    found[key][str(value)] = None
    return {key: list(values) for key, values in found.items()}


def sweep_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """`<group>/<metric>/{mean,std}` and `<group>/n_succeeded` for the sweep's MLflow parent run (MLflow-safe
    keys; the per-metric n stays in report.json, which keeps a 45-cell sweep under a thousand metrics)."""
    out: dict[str, float] = {"sweep/n_cells": float(report["n_cells"]),
                             "sweep/n_succeeded": float(report["n_succeeded"]),
                             "sweep/n_failed": float(report["n_failed"])}
    seen: set[tuple[str, str]] = set()
    for table in report["tables"]:
        for row in table["rows"]:
            prefix = "/".join([row["variant"], *_param_terms(row["params"], "_")])
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

#: The attack table's markdown columns (the attack matrix's), per attack stage.
_MD_ATTACK = (("start_forget_loss", "forget loss at step 0"), ("start_retain_loss", "retain loss at step 0"),
              ("recovered", "recovered"), ("steps_to_recovery", "steps to recovery"),
              ("forget_tokens_to_recovery", "forget tokens to recovery"),
              ("end_gap", "forget loss − reference at the end"),
              ("mean_excess_forget_loss", "forget loss above the reference, mean over the attack"))


def _final_columns(columns: Sequence[str]) -> list[tuple[str, str | None, str]]:
    """(main key, bracketed unablated key or None, header): losses per split, then capability metrics. The main
    number is of the most processed view (calibrated, else ablated) and the header says which."""
    out = []
    for name, header in headline_columns(k.split("/", 1)[1] for k in columns).items():
        main = next(f"{v}/{name}" for v in reversed(VIEWS) if f"{v}/{name}" in columns)
        bracket = f"eval/{name}" if f"eval/{name}" in columns and not main.startswith("eval/") else None
        view = VIEWS[main.split("/", 1)[0]]  # which model the main number is of
        out.append((main, bracket, f"{header}, {view} (unablated)" if bracket else header))
    return out


def _attack_cell(row: Mapping[str, Any], key: str) -> str:
    stat = row["stats"].get(key)
    if key.endswith("/recovered"):
        return f"{round(stat['mean'] * stat['n'])}/{stat['n']}" if stat and stat["mean"] is not None else "–"
    if key.endswith("steps_to_recovery") and (stat is None or stat["mean"] is None):
        steps = row["stats"].get(key.replace("steps_to_recovery", "steps"))
        return f"not recovered within {steps['mean']:.0f} steps" if steps and steps["mean"] else "–"
    fmt = {"steps_to_recovery": ".0f", "tokens_to_recovery": ",.0f", "end_gap": "+.3f"}
    return format_stat(stat, next((f for k, f in fmt.items() if key.endswith(k)), ".3f"), with_n=False)


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report's tables as markdown (the final models' main columns, the attack table and its worst case over
    attack configurations), with cell counts."""
    others = ", ".join(f"{v} {k}" for k, v in sorted(report.get("statuses", {}).items()) if k != SUCCEEDED)
    lines = [f"Cells: {report['n_cells']}, {report['n_succeeded']} succeeded" + (f", {others}" if others else "")
             + ". Statistics are over the succeeded cells only: mean ± sample std (n where a metric has fewer "
               "values than cells).", ""]
    made = report.get("provenance") or {}
    if made.get("code_version"):
        lines += [f"Produced by sgtm {', '.join(made['code_version'])} with torch {', '.join(made['torch'])} on "
                  f"{', '.join(made['device'])}.", ""]
    for table in report["tables"]:
        if table["name"] == "final":
            cols = _final_columns(table["columns"])
            headers = [h for _, _, h in cols]
        elif table["name"] == "attack_worst":
            cols = [(f"worst/{m}", None, h) for m, h in _MD_ATTACK]
            headers = ["worst configuration", *(h for _, _, h in cols)]
        else:
            stages = list(dict.fromkeys(k.split("/")[0] for k in table["columns"]))
            cols = [(f"{st}/{m}", None, h if len(stages) == 1 else f"{st} {h}") for st in stages for m, h in _MD_ATTACK]
            headers = [h for _, _, h in cols]
        lines += [f"### {table['title']}", "", "| group | cells ok | " + " | ".join(headers) + " |",
                  "|---|---|" + "---|" * len(headers)]
        for row in table["rows"]:
            if table["name"] == "final":
                def text(key: str, row: Mapping[str, Any] = row) -> str:
                    stat = row["stats"].get(key)
                    return format_stat(stat, with_n=bool(stat) and stat["n"] != row["n_succeeded"])
                cells = [text(m) + (f" ({text(b)})" if b else "") for m, b, _ in cols]
            else:
                cells = [_attack_cell(row, key) for key, _, _ in cols]
            if table["name"] == "attack_worst":
                cells.insert(0, f"{row['worst']} (of {row['configurations']})")
            prefix = any(k.endswith("/forget_prefix_loss") and v["mean"] is not None for k, v in row["stats"].items())
            label = row["label"] + (" ¹" if prefix and table["name"] == "attack" else "")
            lines.append(f"| {label} | {row['n_succeeded']}/{row['n_cells']} | " + " | ".join(cells) + " |")
        lines.append("")
        if table["name"] == "attack":
            lines += _attack_notes(table)
    missing = [(row["label"], m) for row in report["tables"][0]["rows"] for m in row["missing"]] \
        if report["tables"] else []
    if missing:
        lines.append("Cells left out of the statistics:")
        lines += [f"- {label}, seed {m['seed']}: {m['status']} (cell {m['cell_id']})" for label, m in missing]
        lines.append("")
    if report.get("figures"):
        lines += [f"![{name}]({file})" for name, file in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _attack_notes(table: Mapping[str, Any]) -> list[str]:
    """The reference's spread over seeds, and the zero-step attack of conditional models."""
    lines = []
    for key, stat in table["rows"][0]["stats"].items() if table["rows"] else ():
        if key.endswith("/reference_forget_loss") and stat["mean"] is not None:
            lines.append(f"Reference ({key.split('/')[0]}: each seed's baseline final forget loss, uncalibrated): "
                         f"{format_stat(stat)} nats. Steps and tokens: over the seeds that recovered; the other "
                         "columns over all seeds.")
    for row in table["rows"]:
        for key, stat in row["stats"].items():
            if key.endswith("/forget_prefix_loss") and stat["mean"] is not None:
                lines.append(f"¹ {row['label']}: forget loss at step 0 behind `<|forget|>` instead of `<|safe|>`: "
                             f"{format_stat(stat, with_n=False)} (the zero-step attack).")
    return lines + ([""] if lines else [])
