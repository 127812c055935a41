"""RMU (Li et al. 2024, WMDP), as the SGTM paper ran it on its no-filter model (docs/method.md §13; paper App. J.2).

Two copies of the parent model: a frozen one and an updated one. Each step takes one forget batch and one retain
batch from the parent's training splits (adjacent data unused) and minimizes

    L = mean (h_upd(x_f) - c * u / |u|)^2  +  alpha * mean (h_upd(x_r) - h_frozen(x_r))^2

where h is the residual stream output of block `layer_id` and u ~ Uniform[0, 1)^d is drawn once (the positive
orthant, not an isotropic direction, as the reference). One AdamW step per batch pair, on the selected parameters
only.

Choices made here:
- Parameters are selected by name (`RmuSpec.param_patterns`), never by position: the reference's indices 9-12 break
  as soon as a block holds other tensors. The default is the MLPs (c_fc, c_proj, weights and biases) of blocks
  layer_id-2 .. layer_id, and layer_id defaults to n_layer // 2 - 1: blocks 5, 6, 7 hooked at 7 for the paper's 16
  layers, which is what "scaled to depth" means here (blocks 0, 1 hooked at 1 for a 4-layer model).
- Every other parameter has `requires_grad=False` and is not in the optimizer, so it stays bit-identical.
- Means run over (batch, position, dim) of non-padding positions (padding only occurs in a pool's last row).
- Forwards stop at block layer_id (`hidden_states(upto=...)`): later blocks cannot influence either term.
- The paper's defaults: c = 20, alpha = 100, lr 5e-5, AdamW wd 0.01, 4 rows per batch, seed 42, 250 steps (its
  script runs 240). Evaluation is uncalibrated, like the paper's.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sgtm_engine.config import DataSpec, FilterSpec, MaskMode, NoiseSpec, RmuSpec, Split, from_dict, to_dict
from sgtm_engine.data.prepare import PreparedData, prepare_data
from sgtm_engine.data.sampler import PoolSampler
from sgtm_engine.errors import Cancelled, ConfigError, DataError, TrainingDiverged
from sgtm_engine.evaluate import capability, loss_table
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import load_hf, save_hf
from sgtm_engine.runtime import Runtime, StopFlag
from sgtm_engine.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from sgtm_engine.progress import Emit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Which layer, which parameters


def resolve_layer(spec: RmuSpec, n_layer: int) -> int:
    layer = spec.layer_id if spec.layer_id is not None else max(0, n_layer // 2 - 1)
    if layer >= n_layer:
        raise ConfigError(f"layer_id={layer}: the model has {n_layer} blocks (0 .. {n_layer - 1})")
    return layer


def default_patterns(layer_id: int) -> tuple[str, ...]:
    """The MLPs of blocks layer_id-2 .. layer_id (the paper: 5, 6, 7 of 16)."""
    return tuple(f"transformer.h.{i}.mlp" for i in range(max(0, layer_id - 2), layer_id + 1))


def matches(name: str, pattern: str) -> bool:
    """A parameter name equal to the pattern, below it as a module prefix, or matching it as a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select_parameters(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters the patterns select (tied weights count once, under their first name)."""
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if any(matches(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"param_patterns={list(patterns)}: select no parameter; names look like "
                          f"{names[:3] + names[-3:]}")
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# The two loss terms


def control_vector(d_model: int, coef: float, seed: int) -> torch.Tensor:
    """c * u / |u| with u ~ Uniform[0, 1)^d, from a generator seeded once."""
    u = torch.rand(d_model, generator=torch.Generator().manual_seed(seed))
    return coef * u / u.norm()


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (a - b)^2 over (batch, position, dim) where mask [B, T] is true."""
    sq = (a - b).pow(2) * mask[..., None]
    return sq.sum() / (mask.sum().clamp(min=1) * a.shape[-1])


def rmu_losses(h_forget: torch.Tensor, h_retain: torch.Tensor, h_retain_frozen: torch.Tensor, control: torch.Tensor,
               alpha: float, mask_forget: torch.Tensor, mask_retain: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_forget, L_retain): steer forget activations to the control vector, keep retain activations in place.

    Args:
        h_forget, h_retain: the updated model's hidden states [B, T, d] on the forget and retain batches.
        h_retain_frozen: the frozen model's hidden states on the retain batch.
        control: c * u / |u|, [d].
        alpha: the retain weight.
        mask_forget, mask_retain: [B, T], true on real (non-padding) positions.
    """
    forget = _masked_mse(h_forget, control.expand_as(h_forget), mask_forget)
    retain = alpha * _masked_mse(h_retain, h_retain_frozen, mask_retain)
    return forget, retain


# ---------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RmuResult:
    model: GPTNeoLM
    layer_id: int
    updated: list[str]
    history: list[dict[str, float]]  # per logged step: step, forget_loss, retain_loss
    wall_seconds: float


def split_rows(data: PreparedData) -> dict[str, torch.Tensor]:
    """Training rows per split, for RMU's two batches (adjacent unused)."""
    out = {}
    for split in (Split.FORGET, Split.RETAIN):
        rows = [p.examples for p in data.pools.values() if p.split == split and p.examples.shape[0]]
        if not rows:
            raise DataError(f"RMU needs {split.value} training data; the parent's data has none")
        out[split.value] = torch.cat(rows)
    return out


def rmu(model: GPTNeoLM, data: PreparedData, spec: RmuSpec, runtime: Runtime, tracker: Tracker | None = None,
        emit: Emit | None = None, stop: StopFlag | None = None) -> RmuResult:
    """Unlearn in place: only the selected parameters of `model` change.

    Args:
        model: the model to unlearn (its current weights are the frozen reference too).
        data: the parent's training data (forget and retain pools).
        spec: layer, parameters, coefficients, optimizer, steps, seed.
        runtime, tracker, emit, stop: device, metrics sink, progress events, stop flag.
    """
    tracker = tracker or NullTracker()
    emit = emit or (lambda event: None)
    stop = stop or StopFlag()
    layer = resolve_layer(spec, model.spec.n_layer)
    updated = select_parameters(model, spec.param_patterns or default_patterns(layer))
    model.set_mode(MaskMode.DEFAULT)
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in updated)
    optimizer = torch.optim.AdamW([params[n] for n in updated], lr=spec.lr, betas=tuple(spec.betas),
                                  weight_decay=spec.weight_decay)
    control = control_vector(model.spec.d_model, spec.steering_coef, spec.seed).to(runtime.device)
    sampler = PoolSampler(split_rows(data), seed=spec.seed)
    model.train()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(spec.steps):
        if stop.should_stop(runtime):
            raise Cancelled(f"RMU stopped at step {step} of {spec.steps}")
        xf = sampler.next_batch("forget", spec.batch_size)[:, :-1].to(runtime.device)
        xr = sampler.next_batch("retain", spec.batch_size)[:, :-1].to(runtime.device)
        with runtime.autocast():
            h_f = model.hidden_states(xf, upto=layer).float()
            h_r = model.hidden_states(xr, upto=layer).float()
            with torch.no_grad():
                h_r0 = frozen.hidden_states(xr, upto=layer).float()
        if not h_f.requires_grad:
            raise ConfigError(f"param_patterns selected {updated}, none of which feeds block {layer}'s output: "
                              f"RMU could change nothing; select parameters of blocks 0 .. {layer}")
        lf, lr = rmu_losses(h_f, h_r, h_r0, control, spec.alpha, xf != data.pad_id, xr != data.pad_id)
        loss = lf + lr
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"RMU loss became {float(loss)} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps or step == 0:
            record = {"step": step + 1, "forget_loss": lf.item(), "retain_loss": lr.item()}
            history.append(record)
            if runtime.is_main:
                tracker.log_metrics({"rmu/forget_loss": record["forget_loss"],
                                     "rmu/retain_loss": record["retain_loss"]}, step + 1)
            emit({"type": "progress", "step": step + 1, "total": spec.steps, "metrics": record})
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return RmuResult(model, layer, updated, history, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def run_rmu_stage(spec: RmuSpec, parent: Mapping[str, Any], workdir: Path, runtime: Runtime, cache_dir: Path,
                  tracker: Tracker, emit: Emit, stop: StopFlag) -> dict[str, Any]:
    """Unlearn the parent's model; returns the stage record's own fields (the pipeline adds the lineage)."""
    data = prepare_data(from_dict(DataSpec, parent["data_spec"]), parent["context"], cache_dir, NoiseSpec(),
                        FilterSpec())
    model = load_hf(parent["artifacts"]["model"], device=runtime.device)
    if runtime.is_main:
        tracker.log_params({"spec": to_dict(spec)})
    result = rmu(model, data, spec, runtime, tracker, emit, stop)
    metrics = {f"eval/{k}": v for k, v in loss_table(model, data, spec.eval, runtime).items()}
    metrics.update({f"eval/{k}": v for k, v in capability(model, data, spec.eval, runtime).items()})
    if runtime.is_main:
        tracker.log_metrics(metrics, spec.steps)
    emit({"type": "eval", "step": spec.steps, "total": spec.steps, "metrics": metrics})
    artifacts: dict[str, Any] = {"tokenizer": parent["artifacts"].get("tokenizer")}
    if runtime.is_main:
        artifacts["model"] = str(save_hf(model, workdir / "model", eos_token_id=data.eot_id, pad_token_id=data.pad_id))
    last = result.history[-1]
    return {
        "metrics": metrics,
        "summary": {"layer_id": result.layer_id, "updated_parameters": result.updated,
                    "updated_numel": sum(p.numel() for n, p in model.named_parameters() if n in result.updated),
                    "final_forget_term": last["forget_loss"], "final_retain_term": last["retain_loss"],
                    "steps": spec.steps, "wall_seconds": round(result.wall_seconds, 2)},
        "history": result.history,
        "artifacts": artifacts,
        "resolved_spec": to_dict(spec),
        "method": "rmu",
        "base_method": parent.get("method"),
        "ablated": bool(parent.get("ablated")),
    }
