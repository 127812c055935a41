"""Attention forward + backward: the engine's fused C kernel vs torch's SDPA, per head size, side by side.

This is where fused_attention.MAX_HEAD_DIM comes from: GPT-Neo keeps 32 heads, so head dims are d_model / 32
(4 at the paper's 8M TinyStories shape, 8 at 18M, 16 at 64M, 32 at 254M). Both contenders see the same inputs in
the model's layout ([B, T, H, D] views of the q/k/v projections) and run interleaved, round by round, so machine
noise hits both alike; medians are compared. Causal (global) and 256-window (local) layers at context 512.

Last line: `fused_vs_sdpa_d4=<x> fused_vs_sdpa_d8=<y>` (SDPA time / fused time, forward + backward, global layers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sgtm_engine.model import cpu_kernels, fused_attention


def sdpa(q, k, v, window):
    T = q.shape[1]
    mask = None
    if window:
        i = torch.arange(T)
        rel = i[:, None] - i[None, :]
        mask = (rel >= 0) & (rel < window)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, scale=1.0)
    return o.transpose(1, 2).reshape(q.shape[0], T, -1)


def fused(q, k, v, window):
    return fused_attention.attention(q, k, v, window, 1.0).view(q.shape[0], q.shape[1], -1)


def one_step(fn, base, H, D, window) -> float:
    x = base.detach().requires_grad_(True)
    q, k, v = (t.view(x.shape[0], x.shape[1], H, D) for t in x.split(H * D, dim=-1))
    t0 = time.perf_counter()
    fn(q, k, v, window).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    if cpu_kernels.library() is None:
        raise SystemExit(f"the C kernels cannot be built here: {cpu_kernels.unavailable_reason()}")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, "
          f"context={args.context}, 32 heads; forward + backward per layer, median of {args.rounds}")
    ratios = {}
    for D in (4, 8, 16, 32):
        for window in (0, 256):
            base = torch.randn(args.batch, args.context, 3 * 32 * D, generator=torch.Generator().manual_seed(D))
            times: dict[str, list[float]] = {"sdpa": [], "fused": []}
            for r in range(args.rounds + 1):
                for name, fn in (("sdpa", sdpa), ("fused", fused)):
                    t = one_step(fn, base, 32, D, window)
                    if r:
                        times[name].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["sdpa"] / med["fused"]
            if window == 0:
                ratios[D] = ratio
            layer = "global" if window == 0 else f"local {window}"
            print(f"  head dim {D:2d} {layer:9s}  sdpa {med['sdpa'] * 1000:7.1f} ms  "
                  f"fused {med['fused'] * 1000:7.1f} ms  sdpa/fused {ratio:5.2f}"
                  f"{'  (used)' if D <= fused_attention.MAX_HEAD_DIM else ''}")
    print(f"fused_vs_sdpa_d4={ratios[4]:.2f} fused_vs_sdpa_d8={ratios[8]:.2f}")


if __name__ == "__main__":
    main()
