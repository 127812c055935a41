"""One optimizer step of language-model training, shared by pretraining (train.py) and the attack (attack.py).

Choices (docs/method.md §4, §5):
- The loss is normalized by the target tokens of the whole global batch, so gradient accumulation and DDP (which
  averages gradients over ranks) give exactly the token-weighted mean of one big batch.
- Micro-batches run under DDP's `no_sync` except the last; masks then apply once, to the summed and all-reduced
  gradient, before optional clipping and the (mask-aware) optimizer step. A clean model in `default` mode has nothing
  to mask, so the same step is plain full-parameter training.
- A non-finite loss raises `TrainingDiverged` before the optimizer touches any weight.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sgtm_engine.config import MaskMode
from sgtm_engine.errors import TrainingDiverged
from sgtm_engine.model.gpt_neo import IGNORE_INDEX, GPTNeoLM
from sgtm_engine.model.masking import apply_gradient_masks
from sgtm_engine.model.optim import step_optimizer
from sgtm_engine.runtime import Runtime


class StepStats(NamedTuple):
    loss: float  # token-weighted mean over the global batch
    grad_norm: float  # before clipping
    tokens: int  # target tokens of the global batch


def optimizer_step(net: torch.nn.Module, model: GPTNeoLM, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                   labels: torch.Tensor, mode: MaskMode, runtime: Runtime, micro_batch_size: int | None = None,
                   grad_clip: float | None = None) -> StepStats:
    """Forward/backward over micro-batches, mask once, clip, step.

    Args:
        net: what runs the forward (`Runtime.training_net`: the model, or it in DDP and/or compiled).
        model: the unwrapped model (its partition and mode).
        optimizer: mask-aware or plain AdamW.
        inputs, labels: this rank's batch [b, T] (labels -100 where ignored).
        mode: the step's applied label.
        runtime: device, precision, ranks.
        micro_batch_size: rows per forward/backward; None = the whole per-rank batch.
        grad_clip: max global gradient norm; None = no clipping.
    """
    per_rank = inputs.shape[0]
    micro = min(micro_batch_size or per_rank, per_rank)
    n_micro = math.ceil(per_rank / micro)
    n_tokens = (labels != IGNORE_INDEX).sum().to(torch.float32)
    if runtime.distributed:
        dist.all_reduce(n_tokens)
    denom = n_tokens.clamp(min=1.0)
    model.set_mode(mode)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=runtime.device)
    ddp = getattr(net, "_orig_mod", net)  # a compiled DDP wraps it
    for k in range(n_micro):
        sl = slice(k * micro, (k + 1) * micro)
        sync = contextlib.nullcontext()
        if isinstance(ddp, DistributedDataParallel) and k < n_micro - 1:
            sync = ddp.no_sync()
        with sync, runtime.autocast():
            _, loss = net(inputs[sl], labels[sl])
        count = (labels[sl] != IGNORE_INDEX).sum()
        loss = torch.where(count > 0, loss, torch.zeros_like(loss))  # an all-padding micro-batch's mean is NaN
        weight = count / denom  # this micro-batch's share of the global tokens
        (loss * weight * runtime.world_size).backward()
        loss_sum += loss.detach() * weight
    mean_loss = loss_sum
    if runtime.distributed:
        dist.all_reduce(mean_loss)
    if not torch.isfinite(mean_loss):
        raise TrainingDiverged(f"loss became {float(mean_loss)} (mode {mode.value}); lower optim.lr or set "
                               f"optim.grad_clip")
    apply_gradient_masks(model, model.partition, mode)  # after the all-reduce: identical on every rank
    max_norm = grad_clip if grad_clip is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    step_optimizer(optimizer, model.partition.frozen(mode))
    model.set_mode(MaskMode.DEFAULT)
    return StepStats(float(mean_loss), float(grad_norm), int(n_tokens))
