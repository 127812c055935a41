"""The CUDA check: correctness first, then throughput, then a GPU-scale sweep, each phase's result saved as it ends.

Phases, in this order so that a run cut short still reports the most important thing:
1. correctness: our model against stock `GPTNeoForCausalLM` on the device (fp32, TF32 off: logits, loss and every
   gradient with `assert_close`); for every strategy x mode, after one real optimizer step (the engine's
   `optimizer_step`, bf16 autocast on CUDA, eager and `torch.compile`d), every frozen coordinate has an exactly zero
   gradient and a bit-identical weight, and the coordinates that may learn did move.
2. throughput: the paper's 64M TinyStories shape (`ts-64m`), SGTM masking live with the modes cycling as a real run
   does (default, default, forget, retain), eager and compiled, bf16 autocast; stock HF GPT-Neo (eager, bf16
   autocast, torch AdamW) on the same GPU and batches. MFU = 6 * params * tokens/s / the device's dense bf16 peak.
3. sweep: a sweep file (default `recipes/sweeps/gpu-wiki-bilingual.yaml`) run by the local sweep executor with
   tracking off; its report (JSON, markdown, figures) is copied next to this script's results.

Every output lands in `--out`: `gpu_check.json` (updated after each phase) and the sweep's report files.
`--tiny` shrinks every phase to a CPU-sized rehearsal (`scripts/gpu_rehearsal.sh`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, OptimizerKind, OptimSpec, Precision, Strategy
from sgtm_engine.model.gpt_neo import IGNORE_INDEX, GPTNeoLM
from sgtm_engine.model.hf import to_hf_model
from sgtm_engine.model.masking import region_view
from sgtm_engine.model.optim import build_optimizer
from sgtm_engine.model.partition import Region
from sgtm_engine.runtime import Runtime
from sgtm_engine.steps import optimizer_step

ROOT = Path(__file__).resolve().parent.parent
#: Dense bf16 tensor-core peak by device name (vendor datasheets, SXM parts); MFU is reported against it.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
MODES = (MaskMode.DEFAULT, MaskMode.DEFAULT, MaskMode.FORGET, MaskMode.RETAIN)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def labels_for(ids: torch.Tensor) -> torch.Tensor:
    """Targets aligned to positions (the next token), the last position ignored."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# 1. correctness


def check_hf_parity(device: torch.device) -> dict[str, Any]:
    """fp32 with TF32 off, so that both sides compute the same arithmetic up to kernel order."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    spec = ModelSpec(n_layer=3, d_model=128, n_head=8, context=64, window_size=16, vocab_size=503, output_bias=False)
    torch.manual_seed(0)
    ours = GPTNeoLM(spec).to(device)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so their gradients are compared too
        for name, p in ours.named_parameters():
            if "bias" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf = to_hf_model(ours.cpu()).to(device).eval()
    ours = ours.to(device)
    ids = torch.randint(0, spec.vocab_size, (4, spec.context), device=device)
    logits = ours(ids)[0]
    loss = ours(ids, labels_for(ids))[1]  # the output head in row chunks
    out = hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    out.loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-3, atol=1e-5, msg=f"gradient of {name}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"max_logit_diff": float((logits - out.logits).abs().max().detach()), "params_compared": len(theirs)}


def check_masked_step(strategy: Strategy, mode: MaskMode, compiled: bool, runtime: Runtime) -> dict[str, Any]:
    """One real optimizer step: frozen coordinates get exactly zero gradient and keep every bit; the rest moves."""
    spec = ModelSpec(n_layer=2, d_model=128, n_head=8, context=64, window_size=16, vocab_size=257)
    masking = MaskingSpec(strategy=strategy, forget_mlp_dim=64, forget_attn_heads=2, mask_embeddings=True)
    torch.manual_seed(1)
    model = GPTNeoLM(spec, masking).to(runtime.device)
    optimizer = build_optimizer(model, model.partition, OptimSpec(lr=1e-2, weight_decay=0.1),
                                OptimizerKind.MASK_AWARE)
    net = dataclasses.replace(runtime, compile=compiled).training_net(model)  # the stages' own path
    ids = torch.randint(0, spec.vocab_size, (4, spec.context), device=runtime.device)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer_step(net, model, optimizer, ids, labels_for(ids), mode, runtime)
    frozen = model.partition.frozen(mode)
    bad = []
    for name, region in frozen.items():
        grad = params[name].grad
        if grad is not None and region_view(grad, model.partition, name, region).count_nonzero():
            bad.append(f"{name}[{region.value}] gradient not zero")
        if not torch.equal(region_view(params[name].detach(), model.partition, name, region),
                           region_view(before[name], model.partition, name, region)):
            bad.append(f"{name}[{region.value}] weight changed")
    moved = sum(not torch.equal(p.detach(), before[name]) for name, p in params.items() if name not in frozen
                or frozen[name] is not Region.ALL)
    if moved == 0:
        bad.append("no parameter moved: the step did nothing, so the check proves nothing")
    return {"strategy": strategy.value, "mode": mode.value, "compiled": compiled, "frozen_tensors": len(frozen),
            "moved_tensors": moved, "problems": bad}


def correctness(runtime: Runtime) -> dict[str, Any]:
    parity = check_hf_parity(runtime.device)
    say(f"parity with stock GPTNeoForCausalLM: ok ({parity['params_compared']} gradients, max logit diff "
        f"{parity['max_logit_diff']:.2e})")
    # every strategy x mode eagerly; compiled (one compile per case, so only the cases that matter most): SGTM's
    # forget step (gradient surgery) and retain step (forward on the retain slices)
    plan = [(s, m, False) for s in Strategy for m in (MaskMode.FORGET, MaskMode.RETAIN, MaskMode.DEFAULT)]
    plan += [(Strategy.SGTM, MaskMode.FORGET, True), (Strategy.SGTM, MaskMode.RETAIN, True)]
    cases = []
    for strategy, mode, compiled in plan:
        try:  # one case that cannot run (a compiler missing, out of memory) leaves the others' answers
            case = check_masked_step(strategy, mode, compiled, runtime)
        except Exception as exc:  # noqa: BLE001
            case = {"strategy": strategy.value, "mode": mode.value, "compiled": compiled,
                    "problems": [f"did not run: {type(exc).__name__}: {exc}"]}
        cases.append(case)
        if case["problems"]:
            say(f"FAIL {strategy.value}/{mode.value} compiled={compiled}: {case['problems'][:3]}")
    say(f"masked steps: {sum(not c['problems'] for c in cases)}/{len(cases)} ok "
        f"({sum(c['compiled'] for c in cases)} compiled)")
    return {"parity": parity, "masked_steps": cases, "ok": all(not c["problems"] for c in cases)}


# ---------------------------------------------------------------------------------------------------------------------
# 2. throughput


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def time_steps(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def ours_arm(spec: ModelSpec, compiled: bool, batch: torch.Tensor, runtime: Runtime):
    torch.manual_seed(0)
    model = GPTNeoLM(spec, MaskingSpec(strategy=Strategy.SGTM)).to(runtime.device)
    optimizer = build_optimizer(model, model.partition, OptimSpec(lr=3e-4), OptimizerKind.MASK_AWARE)
    net = dataclasses.replace(runtime, compile=compiled).training_net(model)  # the stages' own path
    labels = labels_for(batch)
    return model, lambda i: optimizer_step(net, model, optimizer, batch, labels, MODES[i % len(MODES)], runtime)


def hf_arm(spec: ModelSpec, batch: torch.Tensor, runtime: Runtime):
    torch.manual_seed(0)
    hf = to_hf_model(GPTNeoLM(spec)).to(runtime.device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-4, fused=runtime.device.type == "cuda")

    def step(_: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = hf(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return hf, step


def throughput(runtime: Runtime, preset: str, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    spec = ModelSpec.preset(preset)
    if spec.vocab_size is None:  # CPU presets take their vocabulary from the data; GPT-2's here
        spec = dataclasses.replace(spec, vocab_size=50257)
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, spec.vocab_size, (batch_size, spec.context), generator=g).to(runtime.device)
    peak = peak_flops(runtime.device)
    arms: dict[str, Any] = {}
    for name in ("ours_eager", "ours_compiled", "hf_eager"):
        try:  # an arm that cannot run (a compiler missing, out of memory) leaves the others' figures
            arms[name] = time_arm(name, spec, batch, runtime, steps, warmup, peak)
            mfu = f"{arms[name]['mfu']:.1%}" if peak else "n/a"
            say(f"{preset} {name:13s} {arms[name]['tokens_per_s']:12,.0f} tokens/s  "
                f"{arms[name]['ms_per_step']:8.1f} ms/step  MFU {mfu}  (warm-up {arms[name]['warmup_s']:.0f} s)")
        except Exception as exc:  # noqa: BLE001
            arms[name] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"{preset} {name:13s} FAILED: {arms[name]['error']}")
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(runtime.device)
    failed = [name for name, arm in arms.items() if "error" in arm]
    if len(failed) == len(arms):
        raise RuntimeError(f"no arm ran: {arms}")
    ms = {name: arm.get("ms_per_step") for name, arm in arms.items()}
    return {"preset": preset, "batch": [batch_size, spec.context], "peak_bf16_flops": peak, "arms": arms,
            "failed_arms": failed,
            "speedup_vs_hf": ms["hf_eager"] / ms["ours_compiled"] if ms["hf_eager"] and ms["ours_compiled"] else None}


def time_arm(name: str, spec: ModelSpec, batch: torch.Tensor, runtime: Runtime, steps: int, warmup: int,
             peak: float | None) -> dict[str, Any]:
    if name == "hf_eager":
        model, step = hf_arm(spec, batch, runtime)
    else:
        model, step = ours_arm(spec, name == "ours_compiled", batch, runtime)
    t0 = time.perf_counter()
    time_steps(step, warmup, runtime.device)  # compiles one graph per mode in the compiled arm
    warm_s = time.perf_counter() - t0
    median = statistics.median(time_steps(step, steps, runtime.device))
    n_params = sum(p.numel() for p in model.parameters())
    rate = batch.numel() / median
    return {"params": n_params, "ms_per_step": median * 1e3, "tokens_per_s": rate, "warmup_s": warm_s,
            "mfu": 6 * n_params * rate / peak if peak else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated(runtime.device) / 2**30
            if runtime.device.type == "cuda" else None}


# ---------------------------------------------------------------------------------------------------------------------
# 3. sweep


def sweep(sweep_file: Path, overrides: list[str], workdir: Path, out: Path, jobs: int) -> dict[str, Any]:
    """The sweep through the local executor (resumable: a rerun skips the cells that already succeeded)."""
    from sgtm_engine.local_sweep import load_sweep, run_sweep
    from sgtm_engine.report import report_files
    from sgtm_engine.yamlio import parse_sets

    t0 = time.perf_counter()
    cells = load_sweep(str(sweep_file), parse_sets(overrides))
    say(f"{cells.name}: {len(cells.cells)} cells, {jobs} at a time")
    report = run_sweep(cells, workdir, jobs=jobs, mlflow_uri=None, echo=say)
    copied = []
    for path in report_files(report, workdir):
        if path.is_file():
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    stages = {}  # where each stage ran (a worker's own GPU) and what it used
    for result in sorted(workdir.glob("stages/*/result.json")):
        record = json.loads(result.read_text())
        stages[result.parent.name] = {"device": record["backends"]["device"], **record.get("resources", {})}
    return {"file": str(sweep_file), "overrides": overrides, "wall_s": time.perf_counter() - t0,
            "n_cells": report["n_cells"], "n_succeeded": report["n_succeeded"], "copied": copied, "stages": stages}


# ---------------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where every result is written")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized rehearsal of every phase")
    ap.add_argument("--phases", default="correctness,throughput,sweep")
    ap.add_argument("--preset", default="ts-64m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--sweep-file", type=Path, default=ROOT / "recipes/sweeps/gpu-wiki-bilingual.yaml")
    ap.add_argument("--sweep-set", action="append", default=[], help="an override for the sweep, repeatable")
    ap.add_argument("--sweep-jobs", type=int, default=1)
    ap.add_argument("--sweep-workdir", type=Path, default=Path("/tmp/sgtm-gpu-sweep"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA device visible")
        return 2
    runtime = Runtime(device, Precision.BF16 if device.type == "cuda" else Precision.FP32)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"backends": runtime.describe(), "argv": sys.argv[1:], "started": time.time()}
    say(f"device {results['backends']['device_name']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ok = True
    for phase in args.phases.split(","):
        t0 = time.perf_counter()
        say(f"== {phase}")
        try:
            if phase == "correctness":
                results[phase] = correctness(runtime)
                ok &= results[phase]["ok"]
            elif phase == "throughput":
                preset, batch = ("cpu-tiny", 4) if args.tiny else (args.preset, args.batch)
                results[phase] = throughput(runtime, preset, batch, args.steps, args.warmup)
            elif phase == "sweep":
                results[phase] = sweep(args.sweep_file, args.sweep_set, args.sweep_workdir, args.out, args.sweep_jobs)
            else:
                raise SystemExit(f"unknown phase {phase!r}")
        except Exception as exc:  # noqa: BLE001 - record it and go on: later phases still say something
            ok = False
            results[phase] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"{phase} FAILED: {type(exc).__name__}: {exc}")
        results[phase]["seconds"] = time.perf_counter() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    say(f"all phases done, ok={ok}; results in {args.out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
