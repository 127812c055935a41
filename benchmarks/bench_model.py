"""Training-step throughput: our SDPA GPT-Neo vs stock HF GPT-Neo (eager), and the cost of an SGTM forget step.

Everything runs in one process, interleaved round by round, from the same weights and batches, so machine noise
hits every contender alike; medians over rounds are compared. Each round runs HF's two steps, one untimed step of
ours (it absorbs what HF's freed memory and cold caches cost the next step), then ours in an order that rotates
from round to round. Shapes: the paper's 8M TinyStories model (6 layers,
d=128, 32 heads, context 512, GPT-2 vocabulary) and a smaller CPU shape.

Contenders per round (one full optimizer step each: forward, backward, masking, AdamW):
- hf:       transformers.GPTNeoForCausalLM (eager attention) + torch.optim.AdamW with its defaults (what a user of
            stock HF gets; on CPU that is the single-tensor loop)
- hf_fused: the same, with torch.optim.AdamW(fused=True): shows how much of the speedup is the optimizer
- clean:    our model, strategy none, + our optimizer as training builds it (mask-aware AdamW, fused kernel), with
            the engine's C kernels (model/cpu_kernels.py: small-head attention, cross-entropy), as training runs it
- torch_k:  the same with the C kernels switched off (runtime.cpu_kernels: false): SDPA and torch's elementwise ops
- sgtm:     our model, strategy sgtm, forget mode: gradient surgery + mask-aware AdamW freezing the retain slices
- retain:   our model, strategy sgtm, retain mode (forward on the retain slices only)

Two phases, both in this process: first with the C library's allocator defaults (as a plain `python` process
runs), then after `runtime.keep_freed_memory()` (what our engine sets on CPU; it speeds up HF's step far more than
ours, because eager attention allocates much more per step). Phase 2 also prints our engine as shipped against
stock HF as shipped (our phase-2 step vs HF's phase-1 step).

Last line: `speedup_vs_hf=<hf/clean at 8M> sgtm_overhead=<sgtm/clean - 1 at 8M>`, both from phase 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, OptimizerKind, OptimSpec, Strategy
from sgtm_engine.model import cpu_kernels
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import to_hf_model
from sgtm_engine.model.masking import apply_gradient_masks
from sgtm_engine.model.optim import build_optimizer, step_optimizer
from sgtm_engine.runtime import keep_freed_memory

OPTIM = OptimSpec(lr=5e-4, weight_decay=0.1)


def make_step(model, optimizer, mode=None, hf=False):
    def step(ids, labels):
        optimizer.zero_grad(set_to_none=True)
        if hf:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            model.set_mode(mode)
            loss = model(ids, labels, return_logits=False)[1]
        loss.backward()
        if hf:
            optimizer.step()
        else:
            apply_gradient_masks(model, model.partition, mode)
            step_optimizer(optimizer, model.partition.frozen(mode))
        return float(loss.detach())
    return step


def bench_shape(name: str, spec: ModelSpec, batch: int, rounds: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.NONE))
    hf = to_hf_model(base).train()
    hf_fused = to_hf_model(base).train()
    clean = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.NONE))
    sgtm = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.SGTM))
    for m in (clean, sgtm):
        m.load_state_dict(base.state_dict())
    torch_adamw = {"lr": OPTIM.lr, "betas": OPTIM.betas, "weight_decay": OPTIM.weight_decay}
    steps = {
        "hf": make_step(hf, torch.optim.AdamW(hf.parameters(), **torch_adamw), hf=True),
        "hf_fused": make_step(hf_fused, torch.optim.AdamW(hf_fused.parameters(), fused=True, **torch_adamw), hf=True),
        "clean": make_step(clean, build_optimizer(clean, clean.partition, OPTIM, OptimizerKind.MASK_AWARE),
                           MaskMode.DEFAULT),
        "sgtm": make_step(sgtm, build_optimizer(sgtm, sgtm.partition, OPTIM, OptimizerKind.MASK_AWARE),
                          MaskMode.FORGET),
    }
    torch_k = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.NONE))
    torch_k.load_state_dict(base.state_dict())
    torch_k_step = make_step(torch_k, build_optimizer(torch_k, torch_k.partition, OPTIM, OptimizerKind.MASK_AWARE),
                             MaskMode.DEFAULT)

    def without_c_kernels(ids, labels):
        cpu_kernels.set_enabled(False)
        try:
            return torch_k_step(ids, labels)
        finally:
            cpu_kernels.set_enabled(True)

    steps["torch_k"] = without_c_kernels
    sgtm_retain = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.SGTM))
    sgtm_retain.load_state_dict(base.state_dict())
    steps["retain"] = make_step(sgtm_retain, build_optimizer(sgtm_retain, sgtm_retain.partition, OPTIM,
                                                             OptimizerKind.MASK_AWARE), MaskMode.RETAIN)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (batch, spec.context), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    times: dict[str, list[float]] = {k: [] for k in steps}
    ours = [k for k in steps if not k.startswith("hf")]
    for r in range(warmup + rounds):
        # The step right after HF's pays for HF's freed memory and cold caches (measured: up to 15%), which would
        # bias whichever of ours runs first. So an untimed settling step runs first, and our contenders rotate
        # through the positions from round to round.
        order = ours[r % len(ours):] + ours[: r % len(ours)]
        for key in ["hf", "hf_fused", None, *order]:
            step = steps[key or order[0]]
            t0 = time.perf_counter()
            step(ids, labels)
            if r >= warmup and key is not None:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * spec.context
    print(f"[{name}] params={base.num_parameters():,} batch={batch}x{spec.context} rounds={rounds}")
    for k, v in med.items():
        print(f"  {k:7s} {v * 1000:9.1f} ms/step  {tokens / v:10.0f} tokens/s")
    res = {"hf": med["hf"], "clean": med["clean"], "speedup": med["hf"] / med["clean"],
           "kernels": med["torch_k"] / med["clean"],
           "overhead": med["sgtm"] / med["clean"] - 1,
           "retain_ratio": med["retain"] / med["clean"], "speedup_fused": med["hf_fused"] / med["clean"]}
    print(f"  speedup_vs_hf={res['speedup']:.2f} (vs hf with fused AdamW: {res['speedup_fused']:.2f}) "
          f"sgtm_forget_overhead={res['overhead'] * 100:+.2f}% retain_step_ratio={res['retain_ratio']:.3f} "
          f"c_kernels_speedup={res['kernels']:.2f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="a multiple of 4: each of ours gets each position equally")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-tuned", action="store_true", help="only phase 1 (allocator defaults)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, C kernels: "
          f"{'built' if cpu_kernels.library() is not None else cpu_kernels.unavailable_reason()}")
    results = {}
    for phase in ("defaults", "tuned"):
        if phase == "tuned":
            if args.skip_tuned or not keep_freed_memory():
                break
            print("\n== phase 2: allocator keeps freed memory (runtime.keep_freed_memory, the engine's CPU default)")
        else:
            print("== phase 1: the C library's allocator defaults")
        bench_shape("small (2L, d=64, ctx 256, V=8192)", ModelSpec(n_layer=2, d_model=64, context=256,
                                                                   vocab_size=8192), args.batch, args.rounds,
                    args.warmup)
        results[phase] = bench_shape("ts-8m (paper)", ModelSpec.preset("ts-8m"), args.batch, args.rounds,
                                     args.warmup)
    main_res = results["defaults"]
    if "tuned" in results:
        tuned = results["tuned"]
        print(f"\nts-8m: same allocator, tuned: speedup_vs_hf={tuned['speedup']:.2f}; our engine as shipped (tuned) vs "
              f"stock HF as shipped (defaults): {main_res['hf'] / tuned['clean']:.2f}x; tuning alone speeds HF up "
              f"{main_res['hf'] / tuned['hf']:.2f}x and ours {main_res['clean'] / tuned['clean']:.2f}x")
    print(f"speedup_vs_hf={main_res['speedup']:.2f} sgtm_overhead={main_res['overhead'] * 100:.2f}%")


if __name__ == "__main__":
    main()
