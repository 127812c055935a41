"""Removing the forget slice: zero it (the paper) or re-draw it from the retain slice's statistics (docs/method.md §9).

Zero-ablation makes every ablated SGTM unit a stationary point: its in-row, bias and out-column are all zero, so its
gradient is exactly zero and a fine-tuning attacker can never revive it (docs/method.md §9). Re-init ablation
gives the attacker live capacity of the right scale instead: each slice is drawn from N(0, sigma) with sigma the
empirical std of the matching retain slice of the same tensor (separately for c_fc weights, c_fc bias, c_proj
columns, q/k/v and out_proj), from an explicitly seeded generator.
"""

from __future__ import annotations

import torch

from sgtm_engine.config import AblateSpec, AblationKind
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.masking import region_view
from sgtm_engine.model.partition import Region


@torch.no_grad()
def ablate(model: GPTNeoLM, spec: AblateSpec) -> dict[str, float]:
    """Ablate θ_forget in place (parameter identity is kept, so optimizers and compiled graphs stay valid).

    Returns, per ablated tensor, the std used for re-init (0.0 for zero-ablation), for the run's record.
    """
    partition = model.partition
    params = dict(model.named_parameters())
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    used: dict[str, float] = {}
    for name, _ in partition.ablation_targets():
        param = params[name]
        forget = region_view(param, partition, name, Region.FORGET)
        if spec.kind == AblationKind.ZERO:
            forget.zero_()
            used[name] = 0.0
            continue
        retain = region_view(param, partition, name, Region.RETAIN)
        sigma = float(retain.float().std()) if retain.numel() > 1 else 0.0
        draw = torch.randn(forget.shape, generator=generator, dtype=torch.float32) * sigma
        forget.copy_(draw.to(device=forget.device, dtype=forget.dtype))
        used[name] = sigma
    return used
