"""`sgtm demo`: no filter vs a recall filter vs gradient routing vs SGTM, on real text, on a CPU, in minutes.

Setting: `wiki-bilingual` (retain = English Wikipedia summaries, forget = Spanish ones), with 2% of the Spanish
documents left unlabelled (recall 0.98, per-document labels). All four methods start from the same seed and see the
same plan of steps; the filter is the 'matching recall filter' (it drops exactly the documents the same classifier
labels Spanish, so the undiscovered 2% leak in). SGTM and gradient routing put 25% of English steps in retain mode
(the paper's TinyStories setting). Every model is zero-ablated (a no-op for the clean ones), logit-calibrated, and
evaluated: loss on held-out English and Spanish, and the share of Spanish in sampled continuations of Spanish prompts.

Outputs in the workdir: `result.json` (all stages), `demo_table.md`, `tradeoff.png`, and the MLflow runs in a
SQLite store (`mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sgtm_engine.config import StageKind, to_dict
from sgtm_engine.recipe import Recipe, Stage, load_recipe
from sgtm_engine.runner import run_recipe
from sgtm_engine.tracking import local_tracking_uri

METHODS = {
    # name: overrides of the train spec
    "no_filter": {"masking": {"strategy": "none"}},
    "recall_filter": {"masking": {"strategy": "none"}, "filter": {"kind": "weak", "matching": "compute"}},
    "gradient_routing": {"masking": {"strategy": "gradient_routing"}, "noise": {"retain_retain_frac": 0.25}},
    "sgtm": {"masking": {"strategy": "sgtm"}, "noise": {"retain_retain_frac": 0.25}},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def demo_recipe(quick: bool) -> Recipe:
    train: dict[str, Any] = {
        "model": {"n_layer": 4, "d_model": 128, "context": 128},
        "masking": {"forget_mlp_dim": 64, "forget_attn_heads": 1},
        "data": {"corpus": "wiki-bilingual", "vocab_size": 4096, "test_docs_per_category": 25},
        "noise": {"recall": 0.98, "granularity": "document", "seed": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1},
        "steps": 40 if quick else 300, "batch_size": 16, "eval_every": None if quick else 50, "eval_ablated": True,
        "checkpoint_every": 100, "log_every": 5, "seed": 0,
        # the train stage tracks losses along the way; the evaluate stage measures capability once at the end
        "eval": {"max_batches": 1 if quick else 4, "capability": False},
    }
    evaluate = {"calibrate": {"steps": 10 if quick else 50, "batch_size": 8, "alpha": 100.0},
                "eval": {"max_batches": 2 if quick else 12, "n_samples": 8 if quick else 48, "sample_tokens": 24}}
    # A short fine-tuning attack on the two models that removed Spanish best: how many steps on a Spanish-heavy
    # mixture bring the forget loss back to the no-filter model's? (The full matrix: `sgtm attack-matrix`.)
    attack = {"steps": 20 if quick else 60, "eval_every": 10 if quick else 20, "batch_size": 16,
              "upsample_forget": 1.7, "save_model": False, "optim": {"lr": 1e-3, "warmup_steps": 10},
              "eval": {"max_batches": 1, "capability": False}}
    stages = []
    for method, extra in METHODS.items():
        stages.append({"name": f"train_{method}", "kind": "train", "spec": _merge(train, extra)})
        stages.append({"name": f"eval_{method}", "kind": "evaluate", "inputs": {"model": f"train_{method}"},
                       "spec": evaluate})
    for method in ATTACKED:
        stages.append({"name": f"attack_{method}", "kind": "attack", "spec": attack,
                       "inputs": {"model": f"train_{method}", "baseline": "train_no_filter"}})
    return load_recipe({"name": "demo-quick" if quick else "demo", "stages": stages})


ATTACKED = ("recall_filter", "sgtm")


# ---------------------------------------------------------------------------------------------------------------------
# Progress, table, plot


class _Progress:
    """A rich progress bar per training stage, fed by the stages' events."""

    def __init__(self, recipe: Recipe):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self.tasks = {}
        self.current: str | None = None
        for stage in recipe.stages:
            total = stage.spec.steps if stage.kind in (StageKind.TRAIN, StageKind.ATTACK) else 1
            self.tasks[stage.name] = self.bar.add_task(stage.name, total=total, info="")
        self.order = [s.name for s in recipe.stages]

    def __call__(self, event: dict[str, Any]) -> None:
        if event["type"] == "started":
            self.current = next(n for n in self.order if not self.bar.tasks[self.tasks[n]].finished)
        task = self.tasks.get(self.current)
        if task is None:
            return
        if event["type"] == "progress":
            loss = event.get("metrics", {}).get("train/loss")
            self.bar.update(task, completed=event["step"], info=f"loss {loss:.3f}" if loss is not None else "")
        elif event["type"] == "finished":
            self.bar.update(task, completed=self.bar.tasks[task].total)


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method in METHODS:
        ev = results["stages"][f"eval_{method}"]["metrics"]
        tr = results["stages"][f"train_{method}"]["summary"]
        rows.append({
            "method": method,
            "retain_loss": ev.get("eval_calibrated/retain/loss"), "forget_loss": ev.get("eval_calibrated/forget/loss"),
            "retain_loss_unablated": ev.get("eval/retain/loss"), "forget_loss_unablated": ev.get("eval/forget/loss"),
            "spanish_share": ev.get("eval_calibrated/capability/forget_es_share"),
            "spanish_share_unablated": ev.get("eval/capability/forget_es_share"),
            "forget_steps": tr["mode_steps"].get("forget", 0), "tokens": tr["tokens"],
            "tokens_per_s": tr["tokens_per_s"],
        })
    return rows


def attack_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for method in ATTACKED:
        rec = results["stages"].get(f"attack_{method}", {}).get("recovery")
        if rec:
            lines.append(f"- {method}: {rec['verdict']} (reference forget loss {rec['reference_forget_loss']:.3f}, "
                         f"the no-filter model's)")
    return lines


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def f(x: float | None, fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = ["| method | retain loss (unablated) | forget loss (unablated) | Spanish share (unablated) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {f(r['retain_loss'])} ({f(r['retain_loss_unablated'])}) | "
                     f"{f(r['forget_loss'])} ({f(r['forget_loss_unablated'])}) | "
                     f"{f(r['spanish_share'], '.2f')} ({f(r['spanish_share_unablated'], '.2f')}) |")
    return "\n".join(lines)


def tradeoff_plot(results: dict[str, Any], path: Path) -> Path:
    """Retain vs forget loss over training (ablated, uncalibrated), final calibrated point as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in METHODS:
        history = results["stages"][f"train_{method}"]["history"]
        xs = [h["metrics"].get("eval_ablated/retain/loss") for h in history]
        ys = [h["metrics"].get("eval_ablated/forget/loss") for h in history]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=method)
        final = results["stages"][f"eval_{method}"]["metrics"]
        ax.plot(final.get("eval_calibrated/retain/loss"), final.get("eval_calibrated/forget/loss"), marker="*",
                ms=14, color=line.get_color())
    ax.set_xlabel("retain (English) loss, ablated")
    ax.set_ylabel("forget (Spanish) loss, ablated")
    ax.set_title("wiki-bilingual, 2% of Spanish unlabelled\n(lines: checkpoints; stars: final, calibrated)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(workdir: Path, quick: bool = False, cache_dir: Path | None = None) -> dict[str, Any]:
    from rich.console import Console

    console = Console()
    recipe = demo_recipe(quick)
    console.print(f"[bold]sgtm demo{' --quick' if quick else ''}[/bold]: {len(METHODS)} methods on wiki-bilingual "
                  f"(retain English, forget Spanish, 2% of Spanish unlabelled), same seed, CPU")
    progress = _Progress(recipe)
    started = time.time()
    with progress.bar:
        results = run_recipe(recipe, workdir, cache_dir=cache_dir, emit=progress, experiment=recipe.name)
    rows = summarize(results)
    table = markdown_table(rows)
    attacks = attack_lines(results)
    (workdir / "demo_table.md").write_text(table + "\n\nFine-tuning attack (Spanish-heavy mixture):\n"
                                           + "\n".join(attacks) + "\n")
    (workdir / "demo_rows.json").write_text(json.dumps(rows, indent=2))
    plot = tradeoff_plot(results, workdir / "tradeoff.png")
    if results.get("mlflow_parent_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(results["mlflow_uri"])
        for artifact in (plot, workdir / "demo_table.md"):
            client.log_artifact(results["mlflow_parent_run_id"], str(artifact))
    minutes = (time.time() - started) / 60
    console.print("\nFinal models, zero-ablated and logit-calibrated (unablated in brackets):\n")
    console.print(table)
    console.print("\nFine-tuning attack on a Spanish-heavy mixture (forget x1.7, lr 1e-3), uncalibrated forget loss:")
    for line in attacks:
        console.print(line)
    console.print(f"\nretain/forget trade-off plot: {plot}")
    console.print(f"table: {workdir / 'demo_table.md'}; all numbers: {workdir / 'result.json'}")
    console.print(f"MLflow UI: mlflow ui --backend-store-uri {local_tracking_uri(workdir)}  (then open "
                  f"http://127.0.0.1:5000)")
    console.print(f"took {minutes:.1f} min; spec of every run: {to_dict(recipe.stages[0].spec)['model']}")
    return results


__all__ = ["run_demo", "demo_recipe", "Stage"]
