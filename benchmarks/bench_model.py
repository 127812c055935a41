"""Training-step throughput: our SDPA GPT-Neo vs stock HF GPT-Neo (eager), and the cost of an SGTM forget step.

Everything runs in one process, interleaved round by round, from the same weights and batches, so machine noise hits
every contender alike; ratios are taken within each round and their median over rounds reported, with the range over
rounds beside it. Both sides use torch's own kernels and the same allocator (whatever the process was started with: no
allocator tuning). Each round runs HF's two steps, one untimed step of ours (it absorbs what HF's freed memory and
cold caches cost the next step), then ours in an order that rotates from round to round. Shapes: the paper's 8M
TinyStories model (6 layers, d=128, 32 heads, context 512, GPT-2 vocabulary) and a smaller CPU shape.

Contenders per round (one full optimizer step each: forward, backward, masking, AdamW):
- hf:       transformers.GPTNeoForCausalLM (eager attention) + torch.optim.AdamW with its defaults (what a user of
            stock HF gets; on CPU that is the single-tensor loop)
- hf_fused: the same, with torch.optim.AdamW(fused=True): shows how much of the difference is the optimizer
- clean:    our model, strategy none, + our optimizer as training builds it (mask-aware AdamW, fused kernel)
- sgtm:     our model, strategy sgtm, forget mode: gradient surgery + mask-aware AdamW freezing the retain slices
- retain:   our model, strategy sgtm, retain mode (forward on the retain slices only)

Last line: `speedup_vs_hf=<hf/clean at 8M> sgtm_overhead=<sgtm/clean - 1 at 8M>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, OptimizerKind, OptimSpec, Strategy
from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import to_hf_model
from sgtm_engine.model.masking import apply_gradient_masks
from sgtm_engine.model.optim import build_optimizer, step_optimizer

OPTIM = OptimSpec(lr=5e-4, weight_decay=0.1)


def make_step(model, optimizer, mode=None, hf=False):
    def step(ids, labels):
        optimizer.zero_grad(set_to_none=True)
        if hf:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            model.set_mode(mode)
            loss = model(ids, labels)[1]
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
    # Ratios are taken within a round, then the median over rounds: a slow round (another process, a page-fault
    # storm) slows every contender of that round and cancels out; the range shows how far single rounds stray.
    ratios = {key: [a / b for a, b in zip(times[num], times[den], strict=True)]
              for key, (num, den) in {"speedup": ("hf", "clean"), "speedup_fused": ("hf_fused", "clean"),
                                      "sgtm": ("sgtm", "clean"), "retain": ("retain", "clean")}.items()}
    mid = {k: statistics.median(v) for k, v in ratios.items()}
    res = {"hf": med["hf"], "clean": med["clean"], "speedup": mid["speedup"], "speedup_fused": mid["speedup_fused"],
           "overhead": mid["sgtm"] - 1, "retain_ratio": mid["retain"]}
    over = [(r - 1) * 100 for r in ratios["sgtm"]]
    print(f"  speedup_vs_hf={res['speedup']:.2f} (rounds {min(ratios['speedup']):.2f}..{max(ratios['speedup']):.2f};"
          f" vs hf with fused AdamW: {res['speedup_fused']:.2f}) sgtm_forget_overhead={res['overhead'] * 100:+.2f}% "
          f"(rounds {min(over):+.1f}..{max(over):+.1f}%) retain_step_ratio={res['retain_ratio']:.3f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="a multiple of 4: each of ours gets each position equally")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    bench_shape("small (2L, d=64, ctx 256, V=8192)", ModelSpec(n_layer=2, d_model=64, context=256, vocab_size=8192),
                args.batch, args.rounds, args.warmup)
    res = bench_shape("ts-8m (paper)", ModelSpec.preset("ts-8m"), args.batch, args.rounds, args.warmup)
    print(f"speedup_vs_hf={res['speedup']:.2f} sgtm_overhead={res['overhead'] * 100:.2f}%")


if __name__ == "__main__":
    main()
