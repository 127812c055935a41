"""The training loop: one data split (pool) and one mode per optimizer step, masking once per step, exact resume.

Choices (docs/method.md §4, §6-§8):
- The plan (pool, mode, skip per step) comes from the data package and is a pure function of the data and seed;
  the LR follows the step index, so skipped steps (epoch-matched filters) still advance the schedule.
- A clean model (strategy none) trains every step as `default`: filters act by dropping data, not by masking.
- Gradient accumulation: micro-batches run under DDP's `no_sync` except the last, so masks apply to the summed,
  all-reduced gradient, once per step. Then optional clipping, then the (mask-aware) optimizer step.
- Checkpoints hold weights, optimizer, sampler position, RNG states, counters and history; a run that finds one in
  its workdir resumes from it and ends bit-identical to an uninterrupted run on CPU.
- A stop request (SIGTERM) is honoured at a step boundary: checkpoint, then `Cancelled`. A non-finite loss raises
  `TrainingDiverged` before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sgtm_engine.checkpoint import (
    describe_differences,
    latest_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    spec_differences,
)
from sgtm_engine.config import CalibrateSpec, MaskMode, Strategy, TrainSpec, to_dict
from sgtm_engine.data.prepare import PreparedData
from sgtm_engine.data.sampler import PoolSampler
from sgtm_engine.errors import Cancelled, ConfigError, DataError
from sgtm_engine.evaluate import evaluate_views, flat_metrics
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import load_state, read_state
from sgtm_engine.model.optim import build_optimizer, lr_at, set_lr
from sgtm_engine.runtime import Runtime, StopFlag
from sgtm_engine.steps import optimizer_step
from sgtm_engine.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)



@dataclass
class TrainState:
    """Counters that travel in checkpoints."""

    step: int = 0  # optimizer-schedule steps done (trained + skipped)
    tokens: int = 0  # target tokens trained on (all ranks)
    mode_steps: dict[str, int] = field(default_factory=lambda: {m.value: 0 for m in MaskMode})
    skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    wall_seconds: float = 0.0


@dataclass
class TrainResult:
    model: GPTNeoLM
    state: TrainState
    plan_counts: dict[str, Any]
    checkpoint: Path
    final_metrics: dict[str, float]


def build_model(spec: TrainSpec, vocab_size: int, device: torch.device) -> GPTNeoLM:
    """The model of a run, initialized from its seed (identically for every strategy)."""
    model = GPTNeoLM(spec.model, spec.masking, vocab_size=vocab_size)
    model.reset_parameters(torch.Generator().manual_seed(spec.seed))
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# One optimizer step


def _train_step(net: torch.nn.Module, model: GPTNeoLM, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                labels: torch.Tensor, mode: MaskMode, spec: TrainSpec, runtime: Runtime) -> tuple[float, float, int]:
    """Forward/backward over micro-batches, mask once, clip, step (steps.optimizer_step, shared with the attack)."""
    stats = optimizer_step(net, model, optimizer, inputs, labels, mode, runtime, spec.micro_batch_size,
                           spec.optim.grad_clip)
    return stats.loss, stats.grad_norm, stats.tokens


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train(spec: TrainSpec, workdir: Path, data: PreparedData, runtime: Runtime, tracker: Tracker | None = None,
          emit: Emit | None = None, stop: StopFlag | None = None, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) the run whose checkpoints live in `workdir`.

    Args:
        spec: the resolved train spec.
        workdir: the run's folder; `checkpoints/` inside it is read on start and written every checkpoint_every.
        data: prepared data (pools, test sets, tokenizer, manifest).
        runtime: device, precision, DDP rank.
        tracker: where metrics go (default: nowhere).
        emit: progress-event callback (events.jsonl, progress bars).
        stop: stop flag checked at step boundaries.
        stop_after: test hook: behave as if a stop arrived after this many steps.
    """
    tracker = tracker or NullTracker()
    emit = emit or (lambda event: None)
    stop = stop or StopFlag()
    model = build_model(spec, data.vocab_size, runtime.device)
    optimizer = build_optimizer(model, model.partition, spec.optim, spec.masking.optimizer)
    plan = data.plan(spec.steps, spec.seed)
    sampler = PoolSampler({n: data.pools[n].examples for n in data.active_pools()}, seed=spec.seed)
    state = TrainState()
    resumed = latest_checkpoint(workdir)
    if resumed is not None:
        state = _restore(resumed.state, resumed.path, model, optimizer, sampler, data, spec)
        log.info("resuming from %s (step %d of %d)", resumed.path, state.step, spec.steps)
        emit({"type": "resumed", "step": state.step, "total": spec.steps, "path": str(resumed.path)})
    net = runtime.training_net(model)
    if runtime.is_main and resumed is None:
        tracker.log_params({"spec": to_dict(spec), "data": {k: v for k, v in data.summary().items()
                                                             if not isinstance(v, dict)}})
        # the label confusion matrix (true split x applied label) of the whole plan, in optimizer steps
        confusion = plan.counts()["label_confusion_steps"]
        tracker.log_metrics({f"labels/{true}/{applied}": n for true, row in confusion.items()
                             for applied, n in row.items()}, 0)
    last_ckpt = resumed.path if resumed else None
    started = time.perf_counter() - state.wall_seconds
    window_tokens, window_start = 0, time.perf_counter()
    while state.step < spec.steps:
        if stop.should_stop(runtime) or (stop_after is not None and state.step >= stop_after):
            last_ckpt = _checkpoint(workdir, model, optimizer, sampler, state, spec, data, started, runtime)
            raise Cancelled(f"stopped at step {state.step} of {spec.steps}; checkpoint {last_ckpt}")
        entry = plan[state.step]
        set_lr(optimizer, lr_at(state.step, spec.optim, spec.steps))
        if entry.skip:
            state.skipped += 1
        else:
            mode = entry.mode if spec.masking.strategy != Strategy.NONE else MaskMode.DEFAULT
            rows = sampler.next_batch(entry.pool, spec.batch_size, runtime.rank, runtime.world_size)
            inputs, labels = data.inputs_and_labels(rows.to(runtime.device))
            loss, grad_norm, n_tokens = _train_step(net, model, optimizer, inputs, labels, mode, spec, runtime)
            state.tokens += n_tokens
            window_tokens += n_tokens
            state.mode_steps[mode.value] += 1
        state.step += 1
        done = state.step == spec.steps
        if not entry.skip and (state.step % spec.log_every == 0 or done):
            now = time.perf_counter()
            metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": optimizer.param_groups[0]["lr"],
                       "train/tokens": state.tokens, "train/tokens_per_s": window_tokens / max(now - window_start,
                                                                                                1e-9),
                       **{f"train/steps_{m}": n for m, n in state.mode_steps.items()}}
            window_tokens, window_start = 0, now
            if runtime.is_main:
                tracker.log_metrics(metrics, state.step)
            emit({"type": "progress", "step": state.step, "total": spec.steps, "metrics": metrics})
        if (spec.eval_every and state.step % spec.eval_every == 0) or done:
            _evaluate(model, data, spec, runtime, state, tracker, emit)
        if (spec.checkpoint_every and state.step % spec.checkpoint_every == 0) or done:
            last_ckpt = _checkpoint(workdir, model, optimizer, sampler, state, spec, data, started, runtime)
            emit({"type": "checkpoint", "step": state.step, "total": spec.steps, "path": str(last_ckpt)})
    if runtime.is_main:
        tracker.log_metrics({"train/skipped_steps": state.skipped}, state.step)
    assert last_ckpt is not None
    final = state.history[-1]["metrics"] if state.history else {}
    return TrainResult(model, state, plan.counts(), last_ckpt, final)


def _evaluate(model: GPTNeoLM, data: PreparedData, spec: TrainSpec, runtime: Runtime, state: TrainState,
              tracker: Tracker, emit: Emit) -> None:
    final = state.step == spec.steps
    views = evaluate_views(model, data, spec.eval, spec.ablate if spec.eval_ablated else None, spec.calibrate
                           if spec.eval_calibrated else _no_calibration(spec), runtime, with_capability=final,
                           emit=emit)
    metrics = flat_metrics(views)
    state.history.append({"step": state.step, "tokens": state.tokens, "flops": 6.0 * model.num_parameters()
                          * state.tokens, "metrics": metrics})
    if runtime.is_main:
        tracker.log_metrics(metrics, state.step)
    emit({"type": "eval", "step": state.step, "total": spec.steps, "metrics": metrics})


def _no_calibration(spec: TrainSpec) -> CalibrateSpec:
    return dataclasses.replace(spec.calibrate, enabled=False)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and resume


def _checkpoint(workdir: Path, model: GPTNeoLM, optimizer: torch.optim.Optimizer, sampler: PoolSampler,
                state: TrainState, spec: TrainSpec, data: PreparedData, started: float, runtime: Runtime) -> Path:
    state.wall_seconds = time.perf_counter() - started
    path = workdir / "checkpoints" / f"step-{state.step:07d}"
    if runtime.is_main:
        payload = {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_states(),
                   "train_state": state.__dict__, "spec": to_dict(spec), "manifest_hash": data.manifest_hash}
        path = save_checkpoint(workdir, state.step, model, payload, keep=spec.keep_checkpoints,
                               eos_token_id=data.eot_id, pad_token_id=data.pad_id)
    if runtime.distributed:
        dist.barrier()
    return path


def _restore(saved: dict[str, Any], path: Path, model: GPTNeoLM, optimizer: torch.optim.Optimizer,
             sampler: PoolSampler, data: PreparedData, spec: TrainSpec) -> TrainState:
    differences = spec_differences(saved.get("spec"), to_dict(spec))
    if differences:
        raise ConfigError(f"checkpoint {path} belongs to a run with a different spec "
                          f"({describe_differences(differences)}): refusing to resume it; use a fresh workdir, or "
                          "overwrite the old run")
    if saved.get("manifest_hash") != data.manifest_hash:
        raise DataError(f"checkpoint {path} was trained on data {saved.get('manifest_hash')}, this run has "
                        f"{data.manifest_hash}: refuse to resume on different data (use a fresh workdir)")
    load_state(model, read_state(path))  # the output bias lives beside the stock weights
    optimizer.load_state_dict(saved["optimizer"])
    sampler.load_state_dict(saved["sampler"])
    restore_rng_states(saved["rng"])
    return TrainState(**saved["train_state"])
