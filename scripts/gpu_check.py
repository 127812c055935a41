"""CUDA path check: the paper's 64M TinyStories shape, bf16 autocast, torch.compile off and on, SGTM masking live.

Trains on synthetic token batches (no network on the device machine) for `--steps` optimizer steps per variant,
cycling the three modes (default / forget / retain) as a real SGTM run does, and prints tokens/s and model FLOPs
utilisation: MFU = 6 * params * tokens/s / peak bf16 FLOP/s (H100/H200 SXM dense peak: 989 TFLOP/s).
Also checks on the GPU that a forget step leaves the retain slice bit-identical (mask-aware AdamW under autocast).
"""

from __future__ import annotations

import argparse
import time

import torch

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, OptimizerKind, OptimSpec, Strategy
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.masking import apply_gradient_masks, region_view
from sgtm_engine.model.optim import build_optimizer, step_optimizer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), 989e12)


def run_variant(spec: ModelSpec, compile_model: bool, steps: int, batch: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.SGTM)).to(device)
    opt = build_optimizer(model, model.partition, OptimSpec(lr=5e-4), OptimizerKind.MASK_AWARE)
    net = torch.compile(model) if compile_model else model
    ids = torch.randint(0, spec.vocab_size, (batch, spec.context + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    modes = [MaskMode.DEFAULT, MaskMode.DEFAULT, MaskMode.FORGET, MaskMode.RETAIN]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> float:
        mode = modes[i % len(modes)]
        model.set_mode(mode)
        opt.zero_grad(set_to_none=True)
        with autocast:
            _, loss = net(inputs, labels)
        loss.backward()
        apply_gradient_masks(model, model.partition, mode)
        step_optimizer(opt, model.partition.frozen(mode))
        return loss

    warm = 8  # compiles one graph per mode
    for i in range(warm):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # invariant on the GPU: a forget step leaves the retain slice bit-identical
    name = "transformer.h.0.mlp.c_fc.weight"
    param = dict(model.named_parameters())[name]
    from sgtm_engine.model.partition import Region

    before = region_view(param, model.partition, name, Region.RETAIN).clone()
    step(2)  # index 2 -> forget
    frozen_ok = torch.equal(before, region_view(param, model.partition, name, Region.RETAIN))
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens_per_s = steps * batch * spec.context / dt
    n_params = model.num_parameters()
    return {"compile": compile_model, "tokens_per_s": tokens_per_s, "mfu": 6 * n_params * tokens_per_s / peak_flops(
        device), "loss": float(loss.detach()), "retain_frozen_on_forget": frozen_ok, "params": n_params,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ts-64m")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
    spec = ModelSpec.preset(args.preset)
    if spec.vocab_size is None:  # CPU presets take the vocabulary from their data; use GPT-2's here
        spec = ModelSpec.preset(args.preset, vocab_size=50257)
    results = []
    for compile_model in ([False] if args.no_compile else [False, True]):
        r = run_variant(spec, compile_model, args.steps, args.batch, device)
        results.append(r)
        print(f"{args.preset} compile={r['compile']!s:5} {r['tokens_per_s']:12,.0f} tokens/s  MFU={r['mfu']:.3f}  "
              f"loss={r['loss']:.3f}  peak_mem={r['peak_mem_gb']:.1f} GB  retain_frozen={r['retain_frozen_on_forget']}")
    last = " ".join(f"tokens_per_s_compile_{r['compile']}={r['tokens_per_s']:.0f} mfu_compile_{r['compile']}="
                    f"{r['mfu']:.3f}" for r in results)
    ok = all(r["retain_frozen_on_forget"] for r in results)
    print(f"{last} invariants_ok={ok}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
