"""The attack matrix: every method of the engine, the same fine-tuning attack, several seeds; one table, one plot.

Per seed s, the stages are (names as in the generated recipe, `<stage>_s<seed>`):
- `train_<m>` for m in no_filter, weak_filter, strict_filter (corpora with an adjacent split only), recall_filter,
  gradient_routing, activation_masking, sgtm, conditional: the same model, data, steps and seed s;
- `rmu`: RMU on the no-filter model (seed 42 + s);
- `attack_<row>` for every row of the table, all with one attack spec (seed s), the reference being
  `train_no_filter_s<s>`'s final uncalibrated forget loss. SGTM is attacked twice, zero- and re-init-ablated;
  gradient routing and activation masking zero-ablated (the paper's ablation); the rest are clean models.

Choices made here:
- Labels are perfect for every method except `recall_filter`, a weak filter whose classifier misses 10% of the
  forget documents (recall 0.9): the robustness question is asked without label noise, and the recall filter shows
  what a realistic filter leaks. SGTM, gradient routing and activation masking put 25% of retain documents in retain
  mode (the paper's TinyStories setting, as the demo).
- On `wiki-bilingual` (no adjacent split) a strict filter is the weak filter (same data, same plan, same model), so
  it is left out there and the table says so; on `wiki-bio` it is a separate row.
- Recovery statistics are over the seeds that recovered (mean and sample std); the table gives `k/n` recovered, and
  "not recovered within N steps" when k = 0.
- Stages whose `result.json` holds the same spec hash are not re-run, so an interrupted matrix continues where it
  stopped, and `--report-only` redraws the table and plot from the results. Seeds may run in parallel processes
  (`jobs`), each with one torch thread.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgtm_engine.config import spec_hash, to_dict
from sgtm_engine.errors import ConfigError
from sgtm_engine.recipe import Recipe, Stage, load_recipe

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# The methods

_CLEAN = {"masking": {"strategy": "none"}}
_MASKED = {"noise": {"retain_retain_frac": 0.25}}

#: Training runs: name -> overrides of the shared train spec.
TRAINS: dict[str, dict[str, Any]] = {
    "no_filter": _CLEAN,
    "weak_filter": {**_CLEAN, "filter": {"kind": "weak"}},
    "strict_filter": {**_CLEAN, "filter": {"kind": "strict"}},
    "recall_filter": {**_CLEAN, "filter": {"kind": "weak"}, "noise": {"recall": 0.9}},
    "gradient_routing": {"masking": {"strategy": "gradient_routing"}, **_MASKED},
    "activation_masking": {"masking": {"strategy": "activation_masking"}, **_MASKED},
    "sgtm": {"masking": {"strategy": "sgtm"}, **_MASKED},
    "conditional": {**_CLEAN, "data": {"conditional": True}},
}


@dataclass(frozen=True)
class Row:
    """One row of the table: what is attacked, and how its forget slice is ablated first."""

    name: str
    parent: str  # a TRAINS key, or "rmu"
    ablation: str | None = None  # zero / reinit for models with a forget slice
    label: str = ""


ROWS: tuple[Row, ...] = (
    Row("no_filter", "no_filter", label="no filter (the reference)"),
    Row("weak_filter", "weak_filter", label="weak filter"),
    Row("strict_filter", "strict_filter", label="strict filter"),
    Row("recall_filter", "recall_filter", label="recall-0.9 filter"),
    Row("gradient_routing", "gradient_routing", "zero", "gradient routing, zero-ablated"),
    Row("activation_masking", "activation_masking", "zero", "activation masking, zero-ablated"),
    Row("sgtm_zero", "sgtm", "zero", "SGTM, zero-ablated"),
    Row("sgtm_reinit", "sgtm", "reinit", "SGTM, re-init-ablated"),
    Row("rmu", "rmu", label="RMU on the no-filter model"),
    Row("conditional", "conditional", label="conditional training (safe token)"),
)

CORPORA_WITH_ADJACENT = frozenset({"wiki-bio", "wikipedia-ores"})

# ---------------------------------------------------------------------------------------------------------------------
# The CPU-sized defaults (measured on a shared 2-core machine: see docs/attack_matrix.md)

CPU_TRAIN: dict[str, Any] = {
    "model": {"n_layer": 2, "d_model": 64, "n_head": 8, "context": 64},
    "masking": {"forget_mlp_dim": 32, "forget_attn_heads": 1},
    "data": {"corpus": "wiki-bilingual", "vocab_size": 2048, "test_docs_per_category": 10},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1},
    "steps": 600, "batch_size": 8, "log_every": 50,
    "eval": {"capability": False},
    "runtime": {"device": "cpu", "threads": 1},
}
CPU_ATTACK: dict[str, Any] = {
    "data": "mixture", "upsample_forget": 1.7,  # ~50% of steps on Spanish, the paper's "50/50 mixture"
    "optim": {"lr": 1e-3, "warmup_steps": 20, "warmup_start": 0.1, "weight_decay": 0.1},
    "steps": 300, "batch_size": 8, "eval_every": 10, "log_every": 50, "save_model": False,
    "eval": {"capability": False},
    "runtime": {"device": "cpu", "threads": 1},
}
CPU_RMU: dict[str, Any] = {
    # The paper's c = 20, 250 steps, 4 rows per batch. Its lr 5e-5 and alpha = 100, hooked at block n_layer//2 - 1,
    # leave this 2-block model's forget loss unchanged to 3 decimals (measured: docs/attack_matrix.md), so the
    # matrix hooks the last block, updates both MLPs, and uses lr 3e-3 with alpha = 3 (+1.1 nats forget, +0.01
    # retain on seed 0).
    "layer_id": 1, "alpha": 3.0, "lr": 3e-3, "steps": 250, "batch_size": 4, "log_every": 50,
    "eval": {"capability": False},
    "runtime": {"device": "cpu", "threads": 1},
}


@dataclass(frozen=True)
class MatrixSpec:
    """What the matrix runs: base specs (plain data, validated when the recipe is built), seeds and rows."""

    seeds: tuple[int, ...] = (0, 1, 2)
    corpus: str = "wiki-bilingual"
    train: Mapping[str, Any] = field(default_factory=lambda: json.loads(json.dumps(CPU_TRAIN)))
    attack: Mapping[str, Any] = field(default_factory=lambda: json.loads(json.dumps(CPU_ATTACK)))
    rmu: Mapping[str, Any] = field(default_factory=lambda: json.loads(json.dumps(CPU_RMU)))
    rows: tuple[str, ...] | None = None
    """Row names to run; None = every row the corpus supports."""

    def active_rows(self) -> list[Row]:
        known = {r.name: r for r in ROWS}
        if self.rows is not None:
            unknown = sorted(set(self.rows) - set(known))
            if unknown:
                raise ConfigError(f"rows={unknown}: unknown; rows are {sorted(known)}")
        names = self.rows or [r.name for r in ROWS]
        out = [known[n] for n in names]
        if self.corpus not in CORPORA_WITH_ADJACENT:
            out = [r for r in out if r.parent != "strict_filter"]  # no adjacent split: strict == weak
        return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A deep merge of plain data (extra wins)."""
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, Mapping) else value
    return out


def with_overrides(spec: MatrixSpec, overrides: Mapping[str, Any]) -> MatrixSpec:
    """Apply `train.steps=…`, `attack.optim.lr=…`, `rmu.steps=…` style overrides."""
    parts: dict[str, dict[str, Any]] = {"train": dict(spec.train), "attack": dict(spec.attack),
                                        "rmu": dict(spec.rmu)}
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if head not in parts or not rest:
            raise ConfigError(f"--set {dotted}: keys start with train., attack. or rmu.")
        node: dict[str, Any] = {}
        leaf = node
        *parents, last = rest.split(".")
        for key in parents:
            leaf = leaf.setdefault(key, {})
        leaf[last] = value
        parts[head] = merge(parts[head], node)
    return MatrixSpec(spec.seeds, spec.corpus, parts["train"], parts["attack"], parts["rmu"], spec.rows)


# ---------------------------------------------------------------------------------------------------------------------
# The recipe


def stage_name(kind: str, what: str | None, seed: int) -> str:
    return f"{kind}_{what}_s{seed}" if what else f"{kind}_s{seed}"


def matrix_recipe(spec: MatrixSpec) -> Recipe:
    """Every stage of the matrix as one recipe (validated); `sgtm run` can run its YAML dump too."""
    rows = spec.active_rows()
    trains = sorted({r.parent for r in rows if r.parent != "rmu"} | {"no_filter"}, key=list(TRAINS).index)
    stages: list[dict[str, Any]] = []
    for seed in spec.seeds:
        base = merge(spec.train, {"seed": seed, "data": {"corpus": spec.corpus}})
        for name in trains:
            stages.append({"name": stage_name("train", name, seed), "kind": "train",
                           "spec": merge(base, TRAINS[name])})
        if any(r.parent == "rmu" for r in rows):
            stages.append({"name": stage_name("rmu", None, seed), "kind": "rmu",
                           "inputs": {"model": stage_name("train", "no_filter", seed)},
                           "spec": merge(spec.rmu, {"seed": 42 + seed})})
        for row in rows:
            parent = stage_name("rmu", None, seed) if row.parent == "rmu" else stage_name("train", row.parent, seed)
            attack = merge(spec.attack, {"seed": seed, "ablate": {"kind": row.ablation or "zero", "seed": seed}})
            stages.append({"name": stage_name("attack", row.name, seed), "kind": "attack",
                           "inputs": {"model": parent, "baseline": stage_name("train", "no_filter", seed)},
                           "spec": attack})
    return load_recipe({"name": f"attack-matrix-{spec.corpus}", "stages": stages,
                        "description": "every method, the same fine-tuning attack, several seeds"})


def recipe_yaml(recipe_data: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(recipe_data)), sort_keys=False)


def recipe_as_data(recipe: Recipe) -> dict[str, Any]:
    return {"name": recipe.name, "description": recipe.description,
            "stages": [{"name": s.name, "kind": s.kind.value, "inputs": dict(s.inputs), "spec": to_dict(s.spec)}
                       for s in recipe.stages]}


# ---------------------------------------------------------------------------------------------------------------------
# Running (resumable, seeds optionally in parallel)


def _done(workdir: Path, stage: Stage) -> bool:
    path = workdir / stage.name / "result.json"
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("spec_hash") == spec_hash(stage.spec)


def run_stages(stages: Sequence[Stage], workdir: Path, cache_dir: Path | None,
               emit: Callable[[str], None] | None = None) -> None:
    """Run stages in order in this process, skipping those already finished with the same spec."""
    import torch

    from sgtm_engine.pipeline import run_stage

    torch.set_num_threads(1)  # small models on a shared machine: one thread per process is fastest here
    for stage in stages:
        if _done(workdir, stage):
            continue
        started = time.perf_counter()
        inputs = {role: workdir / parent for role, parent in stage.inputs.items()}
        run_stage(stage.kind, stage.spec, workdir / stage.name, inputs, cache_dir=cache_dir)
        message = f"{stage.name} done in {time.perf_counter() - started:.1f} s"
        log.info(message)
        if emit:
            emit(message)


def _run_seed(stages: list[Stage], workdir: Path, cache_dir: Path | None) -> None:
    from sgtm_engine.runtime import setup_logging

    setup_logging(level=logging.WARNING)
    log.setLevel(logging.INFO)  # one line per finished stage, without the data package's chatter
    run_stages(stages, workdir, cache_dir)


def run_matrix(spec: MatrixSpec, workdir: Path, cache_dir: Path | None = None, jobs: int = 1,
               emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or finish) the matrix in `workdir`, then write its table, plot and JSON; returns the report."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = matrix_recipe(spec)
    (workdir / "recipe.yaml").write_text(recipe_yaml(recipe_as_data(recipe)))
    started = time.perf_counter()
    by_seed = {s: [st for st in recipe.stages if st.name.endswith(f"_s{s}")] for s in spec.seeds}
    if jobs <= 1:
        for stages in by_seed.values():
            run_stages(stages, workdir, cache_dir, emit)
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(_run_seed, stages, workdir, cache_dir) for stages in by_seed.values()]:
                future.result()
    wall = time.perf_counter() - started
    return write_report(spec, workdir, wall_seconds=wall)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation, table, plot


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None for one value), the sweep report's aggregation."""
    from sgtm_engine.report import mean_std

    stat = mean_std(values)
    return stat.mean, stat.std


def collect(spec: MatrixSpec, workdir: Path) -> list[dict[str, Any]]:
    """One record per (row, seed) from the attack stages' results."""
    out = []
    for row in spec.active_rows():
        for seed in spec.seeds:
            path = workdir / stage_name("attack", row.name, seed) / "result.json"
            if not path.exists():
                continue
            res = json.loads(path.read_text())
            summary, key = res["summary"], res["summary"]["curve_key"]
            curve = [(h["step"], h["metrics"].get(key), h["metrics"].get("retain/loss"), h["forget_tokens"])
                     for h in res["history"]]
            out.append({"row": row.name, "label": row.label, "seed": seed, "curve": curve,
                        "reference": summary["reference_forget_loss"], "steps": summary["steps_to_recovery"],
                        "forget_tokens": summary["forget_tokens_to_recovery"], "attack_steps": summary["steps"],
                        "start_forget": curve[0][1], "start_retain": curve[0][2],
                        "end_forget": curve[-1][1], "end_retain": curve[-1][2],
                        "end_gap": curve[-1][1] - summary["reference_forget_loss"],
                        "forget_prefix_loss": summary.get("forget_prefix_step0_forget_loss"),
                        "ablation": summary["ablation"]})
    return out


def summarize(records: Sequence[Mapping[str, Any]], spec: MatrixSpec) -> list[dict[str, Any]]:
    """Per row: recovered k/n, steps and forget tokens to recovery (mean, std over recovered seeds), start losses."""
    rows = []
    for row in spec.active_rows():
        mine = [r for r in records if r["row"] == row.name]
        if not mine:
            continue
        rec = [r for r in mine if r["steps"] is not None]
        steps, steps_sd = _mean_std([r["steps"] for r in rec])
        tokens, tokens_sd = _mean_std([r["forget_tokens"] for r in rec])
        start_f, start_f_sd = _mean_std([r["start_forget"] for r in mine])
        start_r, start_r_sd = _mean_std([r["start_retain"] for r in mine])
        end_gap, end_gap_sd = _mean_std([r["end_gap"] for r in mine])
        prefix = [r["forget_prefix_loss"] for r in mine if r["forget_prefix_loss"] is not None]
        rows.append({"row": row.name, "label": row.label, "n": len(mine), "recovered": len(rec),
                     "attack_steps": mine[0]["attack_steps"], "steps_mean": steps, "steps_std": steps_sd,
                     "forget_tokens_mean": tokens, "forget_tokens_std": tokens_sd,
                     "start_forget_mean": start_f, "start_forget_std": start_f_sd,
                     "start_retain_mean": start_r, "start_retain_std": start_r_sd,
                     "end_gap_mean": end_gap, "end_gap_std": end_gap_sd,
                     "forget_prefix_loss_mean": _mean_std(prefix)[0]})
    return rows


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    from sgtm_engine.report import Stat, format_stat

    return format_stat(Stat(mean, std, 0), fmt, with_n=False)


def markdown_table(summary: Sequence[Mapping[str, Any]], references: Sequence[float]) -> str:
    ref_mean, ref_std = _mean_std(list(references))
    lines = [
        "| method | forget loss at step 0 | retain loss at step 0 | recovered | steps to recovery | "
        "forget tokens to recovery | forget loss − reference at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if r["recovered"] == 0:
            steps = f"not recovered within {r['attack_steps']} steps"
            tokens = "–"
        else:
            steps = _pm(r["steps_mean"], r["steps_std"], ".0f")
            tokens = _pm(r["forget_tokens_mean"], r["forget_tokens_std"], ",.0f")
        label = r["label"]
        if r["forget_prefix_loss_mean"] is not None:
            label += " ¹"
        lines.append(f"| {label} | {_pm(r['start_forget_mean'], r['start_forget_std'], '.3f')} | "
                     f"{_pm(r['start_retain_mean'], r['start_retain_std'], '.3f')} | {r['recovered']}/{r['n']} | "
                     f"{steps} | {tokens} | {_pm(r['end_gap_mean'], r['end_gap_std'], '+.3f')} |")
    if ref_mean is not None:
        lines.append("")
        lines.append(f"Reference (each seed's no-filter final forget loss, uncalibrated): "
                     f"{_pm(ref_mean, ref_std, '.3f')} nats. Steps and tokens: mean ± sample std over the seeds "
                     f"that recovered; the other columns over all seeds.")
    prefix = [r for r in summary if r["forget_prefix_loss_mean"] is not None]
    for r in prefix:
        lines.append(f"¹ {r['label']}: forget loss at step 0 behind `<|forget|>` instead of `<|safe|>`: "
                     f"{r['forget_prefix_loss_mean']:.3f} (the zero-step attack).")
    return "\n".join(lines)


def recovery_plot(records: Sequence[Mapping[str, Any]], spec: MatrixSpec, path: Path) -> Path:
    """Forget loss minus the seed's reference (left; <= 0 is recovered) and retain loss (right) over the attack,
    mean and ±1 std band over seeds."""
    from sgtm_engine.report import plot_band, plt

    fig, (ax_f, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in spec.active_rows():
        mine = [r for r in records if r["row"] == row.name]
        if not mine:
            continue
        plot_band(ax_f, [[(p[0], p[1] - r["reference"]) for p in r["curve"]] for r in mine], row.label, lw=1.5)
        plot_band(ax_r, [[(p[0], p[2]) for p in r["curve"]] for r in mine], row.label, lw=1.5)
    ax_f.axhline(0.0, color="black", ls="--", lw=1, label="reference: the no-filter model")
    ax_f.set_title("forget loss − reference (held-out, uncalibrated)")
    ax_f.set_ylabel("nats/token above the no-filter model (same seed)")
    ax_r.set_title("retain loss during the attack")
    ax_r.set_ylabel("loss (nats/token)")
    for ax in (ax_f, ax_r):
        ax.set_xlabel("attack step")
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=7)
    fig.suptitle(f"Fine-tuning attack on {spec.corpus}, mean ± std over seeds {list(spec.seeds)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(spec: MatrixSpec, workdir: Path, wall_seconds: float | None = None) -> dict[str, Any]:
    """attack_matrix.{md,json,png} in `workdir` from the finished attack stages."""
    records = collect(spec, workdir)
    summary = summarize(records, spec)
    refs = [r["reference"] for r in records if r["row"] == "no_filter"] or \
        list({r["seed"]: r["reference"] for r in records}.values())
    table = markdown_table(summary, refs)
    (workdir / "attack_matrix.md").write_text(table + "\n")
    plot = recovery_plot(records, spec, workdir / "attack_matrix.png") if records else None
    report = {"spec": {"seeds": list(spec.seeds), "corpus": spec.corpus, "train": spec.train,
                       "attack": spec.attack, "rmu": spec.rmu},
              "summary": summary, "records": records, "table": table,
              "plot": str(plot) if plot else None, "wall_seconds": wall_seconds}
    (workdir / "attack_matrix.json").write_text(json.dumps(report, indent=1, default=_json_default))
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
