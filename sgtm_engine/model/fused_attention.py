"""Fused causal / local-window attention for small heads on CPU, with autograd (kernels/attention.c).

GPT-Neo keeps 32 heads at every size, so the paper's small shapes have 4-8-dim heads, where torch's CPU attention
kernels are bound by per-block call overhead rather than arithmetic (attention was over half of a CPU training step
of the 8M TinyStories shape). The C kernel does one (batch, head) pair per task in L1-sized passes and never writes
a T x T matrix; benchmarks/bench_attention.py measures it against SDPA per head size (that is where MAX_HEAD_DIM
comes from). Used only where `usable` says so; everything else keeps torch's SDPA, as does
`cpu_kernels.set_enabled(False)` (runtime.cpu_kernels: false).
"""

from __future__ import annotations

import torch

from sgtm_engine.model import cpu_kernels

#: Largest head dim the kernel is used for: from 16 on, torch's blocked kernels win on this CPU (bench_attention.py).
MAX_HEAD_DIM = 8


def usable(q: torch.Tensor) -> bool:
    """Whether `attention` handles this [B, T, H, D] query (and its like-shaped keys and values)."""
    return q.shape[-1] <= MAX_HEAD_DIM and cpu_kernels.for_tensor(q) is not None


def _d_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float):  # type: ignore[override]
        q, k, v = (_d_contiguous(x) for x in (q, k, v))
        B, T, H, D = q.shape
        o = q.new_empty(B, T, H, D)
        lse = q.new_empty(B, H, T)
        ctx.lib = cpu_kernels.for_tensor(q)
        kernel = ctx.lib.sgtm_attention_forward
        sq, sk, sv, so = (cpu_kernels.strides(x) for x in (q, k, v, o))
        pq, pk, pv, po, plse = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
        cpu_kernels.parallel(lambda _, lo, hi: kernel(pq, pk, pv, sq, sk, sv, po, so, plse, H, T, D, window, scale,
                                                      lo, hi), B * H)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, grad_o):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        grad_o = _d_contiguous(grad_o)
        B, T, H, D = q.shape
        dq, dk, dv = q.new_empty(B, T, H, D), q.new_empty(B, T, H, D), q.new_empty(B, T, H, D)
        kernel = ctx.lib.sgtm_attention_backward
        st = [cpu_kernels.strides(x) for x in (q, k, v, o, grad_o, dq)]
        ptrs = [x.data_ptr() for x in (q, k, v, o, grad_o, lse)]
        grads = [x.data_ptr() for x in (dq, dk, dv)]
        cpu_kernels.parallel(lambda _, lo, hi: kernel(*ptrs, *st[:5], *grads, st[5], H, T, D, ctx.window, ctx.scale,
                                                      lo, hi), B * H)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0, scale: float = 1.0
              ) -> torch.Tensor:
    """Causal attention over [B, T, H, D] inputs (query i sees keys max(0, i-window+1)..i; window <= 0: all keys
    up to i), scores multiplied by `scale`; returns [B, T, H, D]. Call only where `usable(q)`."""
    if q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(f"fused attention wants equal [B, T, H, D] q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    return _FusedAttention.apply(q, k, v, int(window), float(scale))
