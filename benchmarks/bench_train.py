"""End-to-end training throughput of the demo configuration, and the cost of MLflow logging.

Runs the demo's SGTM training spec (wiki-bilingual, 4 layers, d=128, context 128, batch 16) for `--steps` steps
several times, alternating MLflow logging off (NullTracker) and on (MlflowTracker into a local SQLite store, the
demo's setting: metrics every `log_every` steps, batched), in one process, and compares median wall times.
The final evaluation and checkpoint are the same in both arms, so they cancel out in the ratio.
Last line: `train_tokens_per_s=<x> mlflow_overhead=<y>%`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sgtm_engine.config import TrainSpec, from_dict
from sgtm_engine.data.prepare import prepare_data
from sgtm_engine.folders import local_tracking_uri
from sgtm_engine.local_sweep import load_sweep
from sgtm_engine.runtime import Runtime
from sgtm_engine.tracking import MlflowTracker, NullTracker
from sgtm_engine.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sgtm")
    args = ap.parse_args()
    cell = next(c for c in load_sweep("demo").cells if c.variant == "sgtm")  # recipes/sweeps/demo.yaml
    base = from_dict(TrainSpec, next(s for s in cell.stages if s["name"] == "train")["spec"])
    spec = dataclasses.replace(base, steps=args.steps, eval_every=None, checkpoint_every=None,
                               eval_ablated=False, eval=dataclasses.replace(base.eval, max_batches=1))
    data = prepare_data(spec.data, spec.model.context, args.cache_dir, spec.noise, spec.filter)
    runtime = Runtime(torch.device("cpu"), "fp32")
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    uri = local_tracking_uri(root)
    times: dict[str, list[float]] = {"off": [], "on": []}
    tokens = 0
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, demo SGTM config, {args.steps} steps x "
          f"{spec.batch_size}x{spec.model.context} tokens, log_every={spec.log_every}")
    for r in range(args.rounds + 1):  # round 0 warms caches and the MLflow store; not counted
        for arm in ("off", "on"):
            tracker = MlflowTracker(uri, experiment="bench", run_name=f"{arm}-{r}") if arm == "on" else NullTracker()
            t0 = time.perf_counter()
            result = train(spec, root / f"{arm}-{r}", data, runtime, tracker=tracker)
            tracker.close()
            elapsed = time.perf_counter() - t0
            tokens = result.state.tokens
            if r:
                times[arm].append(elapsed)
                print(f"  round {r} logging {arm:3s}: {elapsed:6.2f} s  {tokens / elapsed:8.0f} tokens/s")
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    shutil.rmtree(root, ignore_errors=True)
    print(f"train_tokens_per_s={tokens / off:.0f} mlflow_overhead={(on / off - 1) * 100:.2f}%")


if __name__ == "__main__":
    main()
