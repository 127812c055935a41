"""The adversarial fine-tuning attack: how many steps and forget tokens until a removed domain is back.

Procedure (docs/method.md §12; paper §5.3):
- Start point: the parent's model (a train, ablate or rmu stage). A model with a forget slice (SGTM, gradient routing,
  activation masking) is ablated first, zero or re-init per `AttackSpec.ablate`, unless the parent is already an
  ablated model; the result is then loaded into a clean model (strategy none) and fine-tuned as one: every
  parameter, stock forward, no masking, one plain AdamW.
- Data: the parent's training corpus, re-prepared from its lineage with the same tokenizer, the same held-out test
  documents and the same training-document cap, but without its filter or label noise: the attacker holds the
  removed data. `mixture` keeps every train split and upsamples forget by k (one split per step, as in
  pretraining); `forget_only` trains on the forget split alone. Held-out documents are never attacked on: the
  stage records every document it trained on and refuses to finish if one of them is a test document.
- Conditional-training parents: the attacker trains in the deployment format, every document behind `<|safe|>`
  (the token evaluation uses). The stage also reports the zero-step attack on such a model: its forget loss when
  the prompt carries `<|forget|>` instead.
- Evaluation: uncalibrated held-out loss at step 0, every `eval_every` steps and at the end (the paper calibrates
  nothing here either). The reference is the no-filter baseline's final uncalibrated forget loss: a number in the
  spec, or the `baseline` input's final model evaluated by this stage's own evaluation, so reference and curve
  cover the same documents (the baseline must share the corpus, held-out draw and context). Recovery = the first
  evaluated step whose forget loss is <= the reference; forget tokens = target tokens trained on forget batches up
  to that step. Mean excess = the area between the curve and the reference where the curve is above it, per step:
  a grade for attacks that do not recover within their budget. Both are pure functions (sgtm_engine/recovery.py).
- Not resumable: an attack is short. A stop request raises `Cancelled` at a step boundary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sgtm_engine.config import (
    AblateSpec,
    AttackData,
    AttackSpec,
    DataSpec,
    FilterSpec,
    MaskingSpec,
    MaskMode,
    NoiseSpec,
    OptimizerKind,
    Split,
    Strategy,
    from_dict,
    to_dict,
)
from sgtm_engine.data.prepare import PreparedData, TestSet, prepare_data
from sgtm_engine.data.sampler import PoolSampler
from sgtm_engine.errors import Cancelled, ConfigError, DataError
from sgtm_engine.evaluate import capability, loss_table
from sgtm_engine.model.ablation import ablate
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import load_hf, load_state, save_hf
from sgtm_engine.model.optim import build_optimizer, lr_at, set_lr
from sgtm_engine.recovery import Recovery, recovery_from_history
from sgtm_engine.runtime import Runtime, StopFlag
from sgtm_engine.steps import optimizer_step
from sgtm_engine.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)


def forget_key(spec: AttackSpec) -> str:
    """The loss_table key compared with the reference."""
    return f"forget/{spec.forget_category}/loss" if spec.forget_category else "forget/loss"


# ---------------------------------------------------------------------------------------------------------------------
# Data and start point


def attack_data_spec(parent: DataSpec, spec: AttackSpec) -> DataSpec:
    """The parent's data spec with the attacker's mixture: same corpus, tokenizer, held-out documents and cap."""
    if spec.data == AttackData.FORGET_ONLY:
        return dataclasses.replace(parent, upsample_forget=1.0, upsample_retain=0.0, upsample_adjacent=0.0)
    return dataclasses.replace(parent, upsample_forget=spec.upsample_forget, upsample_retain=1.0,
                               upsample_adjacent=1.0)


def prepare_attack_data(parent: DataSpec, context: int, spec: AttackSpec, cache_dir: Path) -> PreparedData:
    """Prepared attack data: no filter, no label noise; conditional corpora rewritten behind `<|safe|>`."""
    data = prepare_data(attack_data_spec(parent, spec), context, cache_dir, NoiseSpec(), FilterSpec())
    if data.control is None:
        return data
    forget_id, safe_id = data.control.ids
    pools = {}
    for name, pool in data.pools.items():
        rows = pool.examples.clone()
        rows[rows == forget_id] = safe_id
        pools[name] = dataclasses.replace(pool, examples=rows)
    return dataclasses.replace(data, pools=pools)


def start_model(model: GPTNeoLM, ablate_spec: AblateSpec | None, parent_ablated: bool) -> tuple[GPTNeoLM, str]:
    """(a clean copy of the attack's start point, how it was ablated); `model` is ablated in place if needed."""
    how = "none (clean model)"
    if model.masking.strategy != Strategy.NONE:
        if parent_ablated:
            how = "by the parent stage"
        elif ablate_spec is not None:
            ablate(model, ablate_spec)
            how = ablate_spec.kind.value
        else:
            how = "none (attacked unablated)"
    clean = GPTNeoLM(model.spec, MaskingSpec(strategy=Strategy.NONE), vocab_size=model.vocab_size)
    load_state(clean, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return clean.to(next(model.parameters()).device), how


def _forget_prefix_view(data: PreparedData) -> PreparedData | None:
    """The held-out sets behind `<|forget|>` instead of `<|safe|>` (conditional data only)."""
    if data.control is None:
        return None
    forget_id, safe_id = data.control.ids
    tests = {}
    for key, t in data.test_sets.items():
        tokens = t.tokens.clone()
        tokens[:, 0] = torch.where(tokens[:, 0] == safe_id, forget_id, tokens[:, 0])
        tests[key] = TestSet(t.split, t.category, tokens, t.lengths, t.doc_ids)
    return dataclasses.replace(data, test_sets=tests)


# ---------------------------------------------------------------------------------------------------------------------
# The attack loop


@dataclass
class AttackResult:
    model: GPTNeoLM
    history: list[dict[str, Any]]  # one record per evaluation: step, tokens, forget_tokens, metrics
    recovery: Recovery
    seen_docs: set[str]  # every training document a batch drew from
    forget_steps: int
    tokens: int
    forget_tokens: int
    wall_seconds: float


def attack(model: GPTNeoLM, data: PreparedData, spec: AttackSpec, runtime: Runtime, reference: float,
           tracker: Tracker | None = None, emit: Emit | None = None, stop: StopFlag | None = None) -> AttackResult:
    """Fine-tune a clean `model` (updated in place) on `data`'s pools and record the recovery curve.

    Args:
        model: the start point, already ablated and clean (see `start_model`).
        data: the attacker's data (see `prepare_attack_data`); its test sets are the evaluation.
        spec: steps, batch, optimizer, schedule, evaluation cadence, seed.
        runtime: device, precision, ranks.
        reference: the forget loss that counts as recovered.
        tracker, emit, stop: metrics sink, progress events, stop flag.
    """
    tracker = tracker or NullTracker()
    emit = emit or (lambda event: None)
    stop = stop or StopFlag()
    key = forget_key(spec)
    if spec.batch_size % runtime.world_size:
        raise ConfigError(f"batch_size={spec.batch_size}: must be divisible by the {runtime.world_size} ranks")
    model.train()
    optimizer = build_optimizer(model, model.partition, spec.optim, OptimizerKind.LEGACY)  # one plain AdamW
    pools = data.active_pools()
    plan = data.plan(spec.steps, spec.seed)
    sampler = PoolSampler({n: data.pools[n].examples for n in pools}, seed=spec.seed)
    net = runtime.training_net(model)
    seen_rows: dict[str, set[int]] = {n: set() for n in pools}
    history: list[dict[str, Any]] = []
    tokens = forget_tokens = forget_steps = 0
    started = time.perf_counter()

    def evaluate(step: int, final: bool) -> None:
        metrics = loss_table(model, data, spec.eval, runtime)
        if final:
            metrics.update(capability(model, data, spec.eval, runtime))
        model.train()
        history.append({"step": step, "tokens": tokens, "forget_tokens": forget_tokens, "metrics": metrics})
        if runtime.is_main:
            tracker.log_metrics({f"attack/{k}": v for k, v in metrics.items()}, step)
        emit({"type": "eval", "step": step, "total": spec.steps, "metrics": {key: metrics.get(key)}})

    evaluate(0, final=False)
    per_rank = spec.batch_size // runtime.world_size
    for step in range(spec.steps):
        if stop.should_stop(runtime):
            raise Cancelled(f"attack stopped at step {step} of {spec.steps} (attacks do not resume)")
        entry = plan[step]
        set_lr(optimizer, lr_at(step, spec.optim, spec.steps))
        idx = sampler.next_indices(entry.pool, spec.batch_size)[runtime.rank * per_rank:(runtime.rank + 1) * per_rank]
        seen_rows[entry.pool].update(idx.tolist())
        inputs, labels = data.inputs_and_labels(data.pools[entry.pool].examples[idx].long().to(runtime.device))
        stats = optimizer_step(net, model, optimizer, inputs, labels, MaskMode.DEFAULT, runtime,
                               spec.micro_batch_size, spec.optim.grad_clip)
        tokens += stats.tokens
        if entry.split == Split.FORGET:
            forget_tokens += stats.tokens
            forget_steps += 1
        done = step + 1 == spec.steps
        if (step + 1) % spec.log_every == 0 or done:
            metrics = {"attack/train_loss": stats.loss, "attack/lr": optimizer.param_groups[0]["lr"],
                       "attack/tokens": tokens, "attack/forget_tokens": forget_tokens}
            if runtime.is_main:
                tracker.log_metrics(metrics, step + 1)
            emit({"type": "progress", "step": step + 1, "total": spec.steps, "metrics": metrics})
        if (step + 1) % spec.eval_every == 0 or done:
            evaluate(step + 1, done)
    seen = runtime.union(_documents(data, seen_rows))
    leaked = seen & {d for t in data.test_sets.values() for d in t.doc_ids}
    if leaked:  # prepare_data guarantees this cannot happen; a regression must not go unnoticed
        raise DataError(f"the attack trained on {len(leaked)} held-out test documents, e.g. {sorted(leaked)[:3]}")
    return AttackResult(model, history, recovery_from_history(history, reference, key, spec.steps), seen,
                        forget_steps, tokens, forget_tokens, time.perf_counter() - started)


def _documents(data: PreparedData, rows: Mapping[str, set[int]]) -> set[str]:
    """Ids of every document that the given pool rows hold (rows cross document boundaries)."""
    out: set[str] = set()
    for name, idx in rows.items():
        pool = data.pools[name]
        for i in idx:
            start, end = pool.doc_spans[i].tolist()
            out.update(pool.doc_ids[start:end])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def reference_loss(spec: AttackSpec, baseline: Mapping[str, Any] | None, parent: Mapping[str, Any],
                   runtime: Runtime, cache_dir: Path) -> tuple[float, str]:
    """(the forget loss to recover, where it came from).

    The spec's number if given; else the baseline's final model, evaluated uncalibrated with this attack's own
    evaluation (the same held-out documents and batches as the curve, whatever the baseline stage measured); else,
    for a baseline result without a model, the final uncalibrated forget loss it recorded.
    """
    if spec.reference_forget_loss is not None:
        return spec.reference_forget_loss, "spec"
    if baseline is None:
        raise ConfigError("attack: no reference forget loss; set reference_forget_loss or pass the no-filter "
                          "baseline's workdir as input 'baseline' (--input baseline=<dir>)")
    problems = []
    a, b = parent.get("data_spec") or {}, baseline.get("data_spec") or {}
    for name in ("corpus", "tokenizer", "vocab_size", "test_docs_per_category", "seed", "learn_eot"):
        if a.get(name) != b.get(name):
            problems.append(f"inputs.baseline: data_spec.{name}={b.get(name)!r} differs from the attacked model's "
                            f"{a.get(name)!r}; its forget loss is measured on other documents")
    if parent.get("context") != baseline.get("context"):
        problems.append(f"inputs.baseline: context={baseline.get('context')} differs from the attacked model's "
                        f"{parent.get('context')}")
    model_dir = (baseline.get("artifacts") or {}).get("model")
    metric = f"eval/{forget_key(spec)}"
    recorded = (baseline.get("metrics") or {}).get(metric)
    if model_dir is None and recorded is None:
        problems.append(f"inputs.baseline: its result has neither a model nor a metric {metric!r}")
    if problems:
        raise ConfigError(problems)
    if model_dir is None:
        return float(recorded), "baseline result"
    # the baseline's own data (a conditional parent's test sets carry a control token the baseline lacks)
    data = prepare_data(from_dict(DataSpec, b), baseline["context"], cache_dir, NoiseSpec(), FilterSpec())
    model = load_hf(model_dir, device=runtime.device)
    return loss_table(model, data, spec.eval, runtime)[forget_key(spec)], "baseline model, this attack's evaluation"


def run_attack_stage(spec: AttackSpec, parent: Mapping[str, Any], baseline: Mapping[str, Any] | None, workdir: Path,
                     runtime: Runtime, cache_dir: Path, tracker: Tracker, emit: Emit, stop: StopFlag
                     ) -> dict[str, Any]:
    """Attack the parent's model; returns the stage record's own fields (the pipeline adds the lineage)."""
    reference, reference_source = reference_loss(spec, baseline, parent, runtime, cache_dir)
    data_spec = from_dict(DataSpec, parent["data_spec"])
    data = prepare_attack_data(data_spec, parent["context"], spec, cache_dir)
    parent_model = load_hf(parent["artifacts"]["model"], device=runtime.device)
    model, ablation = start_model(parent_model, spec.ablate, bool(parent.get("ablated")))
    del parent_model
    probe = _forget_prefix_view(data)
    extra: dict[str, float] = {}
    if probe is not None:  # conditional training: the zero-step attack is to ask for the forget domain
        extra["forget_prefix_step0_forget_loss"] = loss_table(model, probe, spec.eval, runtime)[forget_key(spec)]
    if runtime.is_main:
        tracker.log_params({"spec": to_dict(spec), "attack": {"ablation": ablation, "reference": reference}})
    result = attack(model, data, spec, runtime, reference, tracker, emit, stop)
    rec = result.recovery
    log.info("attack on %s (%s): %s", parent.get("method"), ablation, rec.describe())
    artifacts: dict[str, Any] = {"tokenizer": parent["artifacts"].get("tokenizer")}
    if spec.save_model and runtime.is_main:
        artifacts["model"] = str(save_hf(result.model, workdir / "model", eos_token_id=data.eot_id,
                                         pad_token_id=data.pad_id))
    final = result.history[-1]["metrics"]
    metrics = {f"eval/{k}": v for k, v in final.items()}
    start_retain_loss = result.history[0]["metrics"].get("retain/loss")
    curve = {"start_forget_loss": rec.start, "end_gap": rec.end_gap, "mean_excess_forget_loss": rec.mean_excess,
             "start_retain_loss": start_retain_loss}
    metrics.update({f"attack/{k}": v for k, v in curve.items() if v is not None})
    if rec.step is not None:
        metrics["attack/steps_to_recovery"] = float(rec.step)
        metrics["attack/forget_tokens_to_recovery"] = float(rec.forget_tokens or 0)
    if runtime.is_main:
        tracker.log_metrics(metrics, spec.steps)
    pools = data.active_pools()
    return {
        "metrics": metrics,
        "summary": {**rec.as_dict(), **extra, "start_retain_loss": start_retain_loss,
                    "reference_source": reference_source, "ablation": ablation,
                    "parent_method": parent.get("method"),
                    "curve_key": forget_key(spec), "tokens": result.tokens,
                    "forget_tokens": result.forget_tokens, "forget_steps": result.forget_steps,
                    "forget_step_share": result.forget_steps / spec.steps, "documents_seen": len(result.seen_docs),
                    "test_documents_seen": 0, "pools": {n: int(data.pools[n].examples.shape[0]) for n in pools},
                    "wall_seconds": round(result.wall_seconds, 2)},
        "history": result.history,
        "artifacts": artifacts,
        "resolved_spec": to_dict(spec),
        "attack_manifest_hash": data.manifest_hash,
    }
