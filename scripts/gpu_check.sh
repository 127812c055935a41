#!/usr/bin/env bash
# The CUDA check, run on the device machine (an H200 lent by the `device` tool; see the README's GPU section):
#   trains the paper's 64M TinyStories shape with bf16 autocast, torch.compile off and on, for a few hundred steps
#   each, and prints tokens/s and MFU. Budget: under 5 minutes including the install.
# Usage: bash scripts/gpu_check.sh [extra args for scripts/gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The device machine has its own CUDA build of torch; install only what the engine needs beside it, no torch pin.
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)"
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
python3 -m pip install -q "transformers==5.23.0" safetensors >/dev/null 2>&1 || true
timeout 280 python3 scripts/gpu_check.py --preset ts-64m --steps "${STEPS:-200}" --batch "${BATCH:-32}" "$@" \
  | tee "${OUT:-/tmp}/gpu_check.log"
