"""Gradient surgery: zero the gradients of the coordinates a step's mode freezes (docs/method.md §5).

Run once per optimizer step, after the last micro-batch's backward (and so after DDP's all-reduce): masks apply to
the summed gradient. For SGTM on forget steps this is the paper's `adjust_gradients`; for every other
(strategy, mode) the frozen coordinates already have structurally zero gradients and zeroing them again is a no-op
kept for uniformity (and so that clipping and logged grad norms see exactly what the optimizer sees).
"""

from __future__ import annotations

import torch
from torch import nn

from sgtm_engine.config import MaskMode
from sgtm_engine.model.partition import Partition, Region


def region_view(tensor: torch.Tensor, partition: Partition, name: str, region: Region) -> torch.Tensor:
    """The view of `tensor` (a parameter, its grad or an optimizer state) covering `region`."""
    if region is Region.ALL:
        return tensor
    sl = partition.slice_of(name)
    if sl is None or sl.dim is None:
        raise KeyError(f"{name} is not split, so it has no {region.value} region")
    lo, hi = sl.bounds(region)
    return tensor.narrow(sl.dim, lo, hi - lo)


def apply_gradient_masks(model: nn.Module, partition: Partition, mode: MaskMode) -> None:
    """Zero the gradient of every coordinate frozen in `mode`."""
    frozen = partition.frozen(mode)
    if not frozen:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, region in frozen.items():
            grad = params[name].grad
            if grad is not None:
                region_view(grad, partition, name, region).zero_()
