"""Sweep reports: aggregation on known numbers, failed cells counted and left out, and each figure's axes carrying
the right series, from small recorded sweeps (tests/fixtures/report, made by make_fixtures.py from real runs)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from sgtm_engine.recovery import mean_excess
from sgtm_engine.report import (
    build_report,
    format_stat,
    mean_std,
    report_markdown,
)
from sgtm_engine.report_figures import align_curves, attack_figure, tradeoff_figure, undiscovered_figure

FIXTURES = Path(__file__).parents[1] / "fixtures" / "report"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _load(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _cell(variant, seed, metrics, status="succeeded", params=None):
    return {"cell_id": f"{variant}-{seed}-{status}", "variant": variant, "params": params or {}, "seed": seed,
            "status": status, "stages": {"evaluate": {"kind": "evaluate", "metrics": metrics}} if metrics else {}}


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


def test_mean_std_is_the_sample_std_and_undefined_for_one_value():
    stat = mean_std([1.0, 2.0, 4.0])
    assert stat.mean == pytest.approx(7 / 3)
    assert stat.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert stat.n == 3
    assert asdict(mean_std([5.0])) == {"mean": 5.0, "std": None, "n": 1}
    assert asdict(mean_std([None, float("nan")])) == {"mean": None, "std": None, "n": 0}
    assert mean_std([2.0, None, 4.0]).n == 2  # a missing value is not a zero
    assert format_stat(mean_std([1.0, 3.0])) == "2.000 ± 1.414 (n=2)"
    assert format_stat(mean_std([5.0])) == "5.000 (n=1)"
    assert format_stat(None) == "–"


def test_align_curves_averages_per_step_over_the_curves_that_reach_it():
    xs, stats = align_curves([[(0, 1.0), (10, 3.0)], [(0, 3.0), (10, 5.0), (20, 7.0)]])
    assert xs == [0.0, 10.0, 20.0]
    assert [s.mean for s in stats] == [2.0, 4.0, 7.0]
    assert [s.n for s in stats] == [2, 2, 1] and stats[2].std is None


def test_groups_aggregate_over_succeeded_seeds_and_count_the_rest():
    key = "eval_calibrated/forget/loss"
    records = [_cell("sgtm", 0, {key: 6.0, "eval/retain/loss": 5.0}),
               _cell("sgtm", 1, {key: 7.0, "eval/retain/loss": 5.5}),
               _cell("sgtm", 2, {key: 8.0}),                                   # no retain metric: n = 2 there
               _cell("sgtm", 3, {key: 100.0}, status="failed"),               # a failed cell's numbers never count
               _cell("sgtm", 4, None, status="running"),
               _cell("recall_filter", 0, {key: 9.0})]
    report = build_report(records, None)
    assert (report["n_cells"], report["n_succeeded"], report["n_failed"]) == (6, 4, 2)
    assert report["statuses"] == {"succeeded": 4, "failed": 1, "running": 1}
    final = report["tables"][0]
    sgtm, flt = final["rows"]
    assert (sgtm["n_cells"], sgtm["n_succeeded"], sgtm["n_failed"], sgtm["seeds"]) == (5, 3, 2, [0, 1, 2])
    assert {m["status"] for m in sgtm["missing"]} == {"failed", "running"}
    assert sgtm["stats"][key] == {"mean": 7.0, "std": 1.0, "n": 3}
    assert sgtm["stats"]["eval/retain/loss"]["n"] == 2
    assert flt["stats"][key] == {"mean": 9.0, "std": None, "n": 1}
    assert report["metrics"]["sgtm/eval_calibrated/forget/loss/mean"] == 7.0
    assert report["metrics"]["sweep/n_failed"] == 2.0
    assert report["metrics"]["sgtm/n_succeeded"] == 3.0
    assert "recall_filter/eval_calibrated/forget/loss/std" not in report["metrics"]
    md = report_markdown(report)
    # n is shown only where a metric has fewer values than the group has succeeded cells
    assert "| sgtm | 3/5 | 5.250 ± 0.354 (n=2) | 7.000 ± 1.000 |" in md
    assert "seed 3: failed" in md and "seed 4: running" in md


def test_grid_params_split_groups_and_name_mlflow_safe_keys():
    key = "eval_calibrated/retain/loss"
    records = [_cell("sgtm", s, {key: v}, params={"train.noise.recall": r})
               for s, (r, v) in enumerate([(1.0, 5.0), (1.0, 5.2), (0.8, 6.0)])]
    report = build_report(records, None)
    rows = report["tables"][0]["rows"]
    assert [(r["label"], r["stats"][key]["n"]) for r in rows] == [("sgtm (recall=1.0)", 2), ("sgtm (recall=0.8)", 1)]
    assert report["metrics"]["sgtm/recall_0.8/eval_calibrated/retain/loss/mean"] == 6.0


def test_attack_statistics_are_over_recovered_seeds_with_k_of_n():
    records = _load("attack")
    # the recorded attacks all recovered; make one seed of the filter fail to recover
    gone = next(r for r in records if r["variant"] == "weak_filter" and r["seed"] == 1)
    gone["stages"]["attack"]["summary"].update(steps_to_recovery=None, forget_tokens_to_recovery=None)
    summaries = {(r["variant"], r["seed"]): r["stages"]["attack"]["summary"] for r in records}
    report = build_report(records, None)
    attack = next(t for t in report["tables"] if t["name"] == "attack")
    for row in attack["rows"]:
        steps = [summaries[(row["variant"], s)]["steps_to_recovery"] for s in (0, 1)]
        recovered = [s for s in steps if s is not None]
        stat = row["stats"]["attack/steps_to_recovery"]
        assert stat["n"] == len(recovered)
        assert stat["mean"] == (sum(recovered) / len(recovered) if recovered else None)
        assert row["stats"]["attack/recovered"]["mean"] == len(recovered) / 2
    assert attack["rows"][1]["stats"]["attack/steps_to_recovery"] == {"mean": 15.0, "std": None, "n": 1}
    tokens = summaries[("weak_filter", 0)]["forget_tokens_to_recovery"]
    start = mean_std(r["stages"]["attack"]["history"][0]["metrics"]["forget/loss"] for r in records
                     if r["variant"] == "weak_filter").mean
    assert f"| weak_filter | 2/2 | {start:.3f} ± " in report_markdown(report)
    assert f"| 1/2 | 15 | {tokens:,} | " in report_markdown(report)


def test_attack_table_averages_the_mean_excess_over_all_seeds_recovered_or_not():
    records = _load("attack")
    for i, r in enumerate(r for r in records if r["variant"] == "weak_filter"):
        r["stages"]["attack"]["summary"].update(mean_excess_forget_loss=[0.5, 0.7][i], steps_to_recovery=None)
    report = build_report(records, None)
    row = next(r for r in report["tables"][1]["rows"] if r["variant"] == "weak_filter")
    assert row["stats"]["attack/mean_excess_forget_loss"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02),
                                                                            "n": 2})
    md = report_markdown(report)
    assert "| forget loss above the reference, mean over the attack |" in md
    assert md.split("| weak_filter |")[2].split("\n")[0].endswith("| 0.600 ± 0.141 |")


def test_attack_statistics_are_the_attack_stages_own_summary():
    """The report aggregates what each attack stage recorded (its MLflow run shows the same numbers), and the stage's
    curve numbers agree with its history: start and end of the forget curve, the end gap, the mean excess."""
    records = _load("attack")
    report = build_report(records, None)
    fields = ("start_forget_loss", "end_forget_loss", "start_retain_loss", "end_gap", "mean_excess_forget_loss",
              "reference_forget_loss", "steps_to_recovery")
    for row in next(t for t in report["tables"] if t["name"] == "attack")["rows"]:
        attacks = [r["stages"]["attack"] for r in records if r["variant"] == row["variant"]]
        for field in fields:
            assert row["stats"][f"attack/{field}"] == asdict(mean_std(a["summary"][field] for a in attacks)), field
        for a in attacks:  # the fixture's history and metrics are rounded to 4 decimals, its summary is not
            summary, curve = a["summary"], [(h["step"], h["metrics"]["forget/loss"]) for h in a["history"]]
            near = {"abs": 1e-4}
            reference = summary["reference_forget_loss"]
            assert summary["start_forget_loss"] == pytest.approx(curve[0][1], **near)
            assert summary["end_forget_loss"] == pytest.approx(curve[-1][1], **near)
            assert summary["start_retain_loss"] == pytest.approx(a["history"][0]["metrics"]["retain/loss"], **near)
            assert summary["end_gap"] == pytest.approx(summary["end_forget_loss"] - reference)
            assert summary["mean_excess_forget_loss"] == pytest.approx(mean_excess(curve, reference), **near)
            assert a["metrics"]["attack/end_gap"] == pytest.approx(summary["end_gap"], **near)


def test_attack_markdown_says_not_recovered():
    records = _load("attack")
    for r in records:
        r["stages"]["attack"]["summary"]["steps_to_recovery"] = None
    md = report_markdown(build_report(records, None))
    assert "not recovered within 40 steps" in md and "| 0/2 |" in md


def _two_attack_lrs(records: list[dict], faster: dict[str, int | None]) -> list[dict]:
    """The recorded cells under `attack.optim.lr` 1e-3, and copies under 3e-3 whose steps to recovery are `faster`'s
    (None: not recovered) for every seed, one train.noise.recall value throughout."""
    out = []
    for lr in (1e-3, 3e-3):
        for rec in copy.deepcopy(records):
            rec["params"] = {"train.noise.recall": 0.9, "attack.optim.lr": lr}
            rec["cell_id"] += f"-{lr}"
            if lr == 3e-3 and rec["variant"] in faster:
                rec["stages"]["attack"]["summary"]["steps_to_recovery"] = faster[rec["variant"]]
            out.append(rec)
    return out


def test_the_worst_case_over_attack_configurations_is_the_attackers_best():
    """weak_filter recovers in 15 steps at lr 1e-3 and 4 at 3e-3: 3e-3 is its worst case. sgtm recovers in 5 at 1e-3
    and not at all at 3e-3: 1e-3 is its worst case (recovering at all outranks any step count)."""
    report = build_report(_two_attack_lrs(_load("attack"), {"weak_filter": 4, "sgtm": None}), None)
    worst = next(t for t in report["tables"] if t["name"] == "attack_worst")
    rows = {r["variant"]: r for r in worst["rows"]}
    assert set(rows) == {"sgtm", "weak_filter"}
    assert rows["weak_filter"]["params"] == {"train.noise.recall": 0.9}  # the attack axis is what it ranges over
    assert rows["weak_filter"]["worst"] == "lr=0.003" and rows["weak_filter"]["configurations"] == 2
    assert rows["weak_filter"]["stats"]["worst/steps_to_recovery"] == {"mean": 4.0, "std": 0.0, "n": 2}
    assert rows["sgtm"]["worst"] == "lr=0.001"
    assert rows["sgtm"]["stats"]["worst/steps_to_recovery"] == {"mean": 5.0, "std": 0.0, "n": 2}
    assert report["metrics"]["weak_filter/recall_0.9/worst/steps_to_recovery/mean"] == 4.0
    md = report_markdown(report)
    assert "### Fine-tuning attack, the worst case over attack configurations" in md
    assert "| weak_filter (recall=0.9) | 2/2 | lr=0.003 (of 2) | " in md
    for table in md.split("### ")[1:]:  # every row of every table has the header's columns
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in rows}) == 1, table


def test_ties_in_recovery_are_broken_by_the_forget_loss_left_above_the_reference():
    records = _two_attack_lrs(_load("attack"), {})
    for rec in records:
        rec["stages"]["attack"]["summary"].update(
            steps_to_recovery=None, mean_excess_forget_loss=0.2 if rec["params"]["attack.optim.lr"] == 3e-3 else 0.4)
    report = build_report(records, None)
    assert {r["worst"] for r in report["tables"][2]["rows"]} == {"lr=0.003"}
    worst_md = report_markdown(report).split("worst case over attack configurations")[1]
    assert "| lr=0.003 (of 2) | " in worst_md and "| 0/2 | not recovered within 40 steps |" in worst_md
    assert worst_md.count("| 0.200 ± 0.000 |") == 2


def test_no_worst_case_without_a_choice_of_attack():
    """A grid over training settings only, one attack stage per cell: each group met one attack configuration."""
    records = _load("attack")
    for rec in records:
        rec["params"] = {"train.noise.recall": 0.9}
    assert [t["name"] for t in build_report(records, None)["tables"]] == ["final", "attack"]


def test_attack_stages_of_one_cell_are_configurations_too():
    records = _load("attack")
    for rec in records:
        strong = copy.deepcopy(rec["stages"]["attack"])
        strong["summary"]["steps_to_recovery"] = 2 if rec["variant"] == "sgtm" else None
        rec["stages"]["attack_strong"] = strong
    rows = {r["variant"]: r for r in build_report(records, None)["tables"][2]["rows"]}
    assert rows["sgtm"]["worst"] == "attack_strong" and rows["weak_filter"]["worst"] == "attack"
    assert rows["sgtm"]["stats"]["worst/steps_to_recovery"]["mean"] == 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Figures from recorded runs


def test_tradeoff_figure_has_a_line_per_method_in_calibrated_and_uncalibrated_panels():
    records = _load("undiscovered")
    fig = tradeoff_figure(records)
    axes = fig.axes
    assert len(axes) == 2 * 2  # rows: recall 1.0 and 0.8; columns: ablated-uncalibrated, calibrated
    assert "ablated, uncalibrated" in axes[0].get_title() and "calibrated" in axes[1].get_title()
    assert "recall=1.0" in axes[0].get_title() and "recall=0.8" in axes[2].get_title()
    for ax in axes:
        assert ax.get_xlabel().startswith("retain loss") and ax.get_ylabel().startswith("forget loss")
        labelled = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == ["sgtm", "gradient_routing", "recall_filter"]
        for line in labelled:
            assert len(line.get_xdata()) == 3  # checkpoints at steps 10, 20, 30
    # the first panel's sgtm line is the mean over seeds of each checkpoint's (retain, forget)
    sgtm = [r for r in records if r["variant"] == "sgtm" and r["params"]["train.noise.recall"] == 1.0]
    first = [h["metrics"]["eval_ablated/retain/loss"] for r in sgtm for h in r["stages"]["train"]["history"][:1]]
    assert axes[0].get_lines()[0].get_xdata()[0] == pytest.approx(sum(first) / len(first))


def test_undiscovered_figure_is_symlog_in_percent_with_error_bars_per_method():
    records = _load("undiscovered")
    fig = undiscovered_figure(records)
    assert fig is not None
    retain, forget = fig.axes[0], fig.axes[1]
    for ax, split in ((retain, "retain"), (forget, "forget")):
        assert ax.get_xscale() == "symlog"
        assert "undiscovered" in ax.get_xlabel() and "%" in ax.get_xlabel()
        assert ax.get_ylabel() == f"{split} loss (nats/token)"
        assert "calibrated" in ax.get_title()
        assert [c.get_label() for c in ax.containers] == ["sgtm", "gradient_routing", "recall_filter"]
        for container in ax.containers:
            line, _, (bars,) = container.lines[0], container.lines[1], container.lines[2]
            assert list(line.get_xdata()) == [0.0, 20.0]  # recall 1.0 and 0.8 -> 0% and 20% undiscovered
            assert len(bars.get_segments()) == 2  # one error bar per rate (two seeds each)
    # the plotted point is the mean over seeds of the evaluate stage's calibrated forget loss
    vals = [r["stages"]["evaluate"]["metrics"]["eval_calibrated/forget/loss"] for r in records
            if r["variant"] == "sgtm" and r["params"]["train.noise.recall"] == 0.8]
    assert forget.containers[0].lines[0].get_ydata()[1] == pytest.approx(sum(vals) / 2)
    assert len(fig.axes) == 4  # and a second row: ablated, uncalibrated


def test_undiscovered_figure_needs_a_recall_axis():
    records = [r for r in _load("undiscovered") if r["params"]["train.noise.recall"] == 1.0]
    assert undiscovered_figure(records) is None
    assert attack_figure(records) is None


def test_attack_figure_has_bands_reference_and_recovery_bars():
    records = _load("attack")
    fig = attack_figure(records)
    curves, retain, bars = fig.axes[:3]
    labels = [line.get_label() for line in curves.get_lines()]
    assert labels == ["sgtm", "weak_filter", "reference (the baseline, same seed)"]
    gaps = [r["stages"]["attack"]["history"][0]["metrics"]["forget/loss"]
            - r["stages"]["attack"]["summary"]["reference_forget_loss"] for r in records if r["variant"] == "sgtm"]
    assert curves.get_lines()[0].get_ydata()[0] == pytest.approx(sum(gaps) / len(gaps))  # against each seed's own
    assert [line.get_label() for line in retain.get_lines()] == ["sgtm", "weak_filter"]
    assert retain.get_ylabel().startswith("retain loss")
    assert curves.get_xlabel() == "attack step" and curves.get_ylabel().startswith("forget loss")
    assert list(curves.get_lines()[0].get_xdata()) == list(range(0, 41, 5))  # evaluations every 5 attack steps
    assert len(curves.collections) == 2  # a ±std band per method (two seeds)
    assert [t.get_text() for t in bars.get_xticklabels()] == ["sgtm", "weak_filter"]
    assert len(bars.patches) == 2
    assert all("/2" in t.get_text() for t in bars.texts)  # k/n recovered
    assert bars.get_ylabel() == "attack steps to recover the reference"


def test_build_report_writes_figures_markdown_and_json(tmp_path):
    records = _load("undiscovered") + _load("attack")
    broken = copy.deepcopy(records[0])
    broken.update(cell_id="broken", status="failed", stages={})
    report = build_report(records + [broken], tmp_path)
    assert set(report["figures"]) == {"tradeoff", "undiscovered_rate", "attack"}
    assert report["figures"] == {name: f"{name}.png" for name in report["figures"]}  # beside report.json
    for file in report["figures"].values():
        assert (tmp_path / file).stat().st_size > 10_000
    assert (tmp_path / "report.md").read_text().count("![") == 3
    assert json.loads((tmp_path / "report.json").read_text())["n_failed"] == 1
    assert report["n_cells"] == len(records) + 1


def test_report_json_is_strict_json_when_a_cell_diverged(tmp_path):
    """A diverged seed's NaN or infinite loss is left out of the statistics; report.json stays readable by strict
    JSON readers (JavaScript's JSON.parse, the API's clients), which know no NaN or Infinity."""
    records = [_cell("sgtm", 0, {"eval/forget/loss": 7.0}), _cell("sgtm", 1, {"eval/forget/loss": float("nan")}),
               _cell("sgtm", 2, {"eval/forget/loss": float("inf")})]
    build_report(records, tmp_path)

    def refuse(constant):
        raise AssertionError(f"report.json holds {constant}")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert report["tables"][0]["rows"][0]["stats"]["eval/forget/loss"] == {"mean": 7.0, "std": None, "n": 1}


def test_the_report_says_what_produced_its_cells():
    cpu = {"device": "cpu", "device_name": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.13.0+cpu"}
    gpu = {"device": "cuda:0", "device_name": "NVIDIA H200", "cuda": "12.8", "torch": "2.11.0"}
    records = [_cell("sgtm", seed, {"eval/retain/loss": 5.0}) for seed in (0, 1, 2)]
    for rec, backends, commit in zip(records, (cpu, cpu, gpu), ("abc", "abc", "def"), strict=True):
        rec["stages"]["evaluate"].update(backends=backends, code_version=commit)
    report = build_report(records)
    assert report["provenance"] == {"code_version": ["abc", "def"], "torch": ["2.13.0+cpu", "2.11.0"],
                                    "device": ["AMD EPYC (AVX512)", "NVIDIA H200 (CUDA 12.8)"]}
    assert ("Produced by sgtm abc, def with torch 2.13.0+cpu, 2.11.0 on AMD EPYC (AVX512), NVIDIA H200 (CUDA 12.8)."
            in report_markdown(report))
    unknown = build_report([_cell("sgtm", 0, {"eval/retain/loss": 5.0})])  # results recorded without backends
    assert unknown["provenance"]["device"] == [] and "Produced by" not in report_markdown(unknown)


# ---------------------------------------------------------------------------------------------------------------------
# The sweep recipes


SWEEPS = sorted((Path(__file__).parents[2] / "recipes" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_recipes_expand(path):
    import yaml

    from sgtm_engine.sweep import parse_sweep

    sweep = parse_sweep(yaml.safe_load(path.read_text()))
    assert sweep.cells and all(c.variant for c in sweep.cells)
    assert path.read_text().startswith("#")  # a header: what it reproduces and what it costs


def test_cpu_undiscovered_rate_sweep_is_45_cells_at_5_rates():
    import yaml

    from sgtm_engine.sweep import parse_sweep

    sweep = parse_sweep(yaml.safe_load((Path(__file__).parents[2] / "recipes" / "sweeps" /
                                        "cpu-undiscovered-rate.yaml").read_text()))
    assert len(sweep.cells) == 45 and sweep.seeds == [0, 1, 2]
    assert sorted({c.params["train.noise.recall"] for c in sweep.cells}) == [0.5, 0.8, 0.95, 0.99, 1.0]
    by_variant = {c.variant: c for c in sweep.cells}
    assert set(by_variant) == {"sgtm", "gradient_routing", "recall_filter"}
    assert [s["name"] for s in by_variant["recall_filter"].stages] == ["train", "evaluate"]
    train = {c.variant: c.stages[0]["spec"] for c in sweep.cells if c.seed == 2}
    assert train["sgtm"]["seed"] == 2 and train["sgtm"]["noise"]["seed"] == 2
    assert train["recall_filter"]["filter"] == {"kind": "weak", "matching": "epoch"}
    assert train["sgtm"]["eval_calibrated"] and train["sgtm"]["eval_every"] == 100
