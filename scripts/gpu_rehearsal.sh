#!/usr/bin/env bash
# Rehearse scripts/gpu_check.sh on CPU under the conditions of an offline GPU host, so packaging problems show
# before a GPU run: a fresh venv holding only the packages such a host has (torch, transformers, tokenizers, safetensors,
# numpy, matplotlib, rich, typer, pyyaml; no mlflow, no corpus package, no language identifier, no sgtm install),
# the carried wheels from .whl/ installed with `pip --no-index`, no network (a new network namespace), and every
# phase at a CPU-sized preset. Not part of `make test`: it builds a venv (~1 min) and takes a few minutes more.
# Usage: bash scripts/gpu_rehearsal.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/sgtm-gpu-rehearsal}"
venv="${SGTM_REHEARSAL_VENV:-/tmp/sgtm-gpu-rehearsal-venv}"
python="${PYTHON:-python3.11}"  # the Python the torch==2.13.0 CPU pin is installed with
if [ ! -x "$venv/bin/python3" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python3" -m pip install -q torch==2.13.0 transformers==5.17.0 "tokenizers>=0.22,<0.24" safetensors \
    numpy matplotlib rich typer pyyaml
fi
[ -n "$(ls .whl/*.whl 2>/dev/null)" ] || bash scripts/gpu_wheels.sh
rm -rf "$out" /tmp/sgtm-gpu-sweep-rehearsal
# the sweep shrunk to CPU size: two tiny widths, one seed, a few steps
tiny_sweep=(--sweep-set 'grid={train.model.d_model: [32, 64]}' --sweep-set 'seeds=[0]'
  --sweep-set 'train.model={n_layer: 2, n_head: 8, context: 64, window_size: 32}'
  --sweep-set 'train.data={vocab_size: 512, max_docs_per_split: 40, test_docs_per_category: 2}'
  --sweep-set 'train.steps=4' --sweep-set 'train.batch_size=4' --sweep-set 'train.eval_every=2'
  --sweep-set 'train.checkpoint_every=4' --sweep-set 'train.masking.forget_mlp_dim=16'
  --sweep-set 'train.eval={max_batches: 1}' --sweep-set 'train.calibrate={steps: 2, batch_size: 4}'
  --sweep-set 'evaluate.calibrate={steps: 2, batch_size: 4}' --sweep-set 'evaluate.eval={max_batches: 1, n_samples: 4}')
env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" SGTM_GPU_OUT="$out" SGTM_GPU_BUDGET_S=900 \
  unshare -n bash scripts/gpu_check.sh --device cpu --tiny --steps 3 --warmup 4 --sweep-jobs 2 \
  --sweep-workdir /tmp/sgtm-gpu-sweep-rehearsal "${tiny_sweep[@]}"
for made in gpu_check.json report.json report.md tradeoff.png; do  # what a GPU run brings back
  [ -s "$out/$made" ] || { echo "rehearsal failed: $out/$made is missing" >&2; exit 1; }
done
echo "rehearsal passed; outputs in $out: $(ls "$out" | tr '\n' ' ')"
