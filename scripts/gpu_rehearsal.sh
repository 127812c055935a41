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
env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" SGTM_GPU_OUT="$out" SGTM_GPU_BUDGET_S=900 \
  unshare -n bash scripts/gpu_check.sh --device cpu --tiny --steps 3 --warmup 4 \
  --sweep-workdir /tmp/sgtm-gpu-sweep-rehearsal \
  --sweep-set "train.model={preset_note: 0}" 
