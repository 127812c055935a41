#!/usr/bin/env bash
# The CUDA check (scripts/gpu_check.py: correctness, throughput, GPU-scale sweep) on a GPU host with a preinstalled
# PyTorch stack and no package index: the engine runs from this checkout through PYTHONPATH, packages the host lacks
# come as wheels from the git-ignored folder .whl/ (scripts/gpu_wheels.sh fills it), MLflow tracking is off, and
# every output lands in one folder: $SGTM_GPU_OUT, else $OUT, else /tmp/sgtm-gpu-check. One command; it stops itself after
# $SGTM_GPU_BUDGET_S seconds (default 470) and each phase saves its results as it ends.
# Usage: bash scripts/gpu_check.sh [args for scripts/gpu_check.py, e.g. --device cpu --tiny for a rehearsal]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${SGTM_GPU_OUT:-${OUT:-/tmp/sgtm-gpu-check}}"
budget="${SGTM_GPU_BUDGET_S:-470}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_TRACKING_URI= TOKENIZERS_PARALLELISM=false
site="${TMPDIR:-/tmp}/sgtm-gpu-site"
pythonpath="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  pythonpath="$pythonpath:$site"
fi
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import importlib, sys
import torch
missing = [m for m in ("transformers", "tokenizers", "safetensors", "numpy", "matplotlib", "yaml", "typer", "rich",
                       "py3langid", "sgtm_engine") if importlib.util.find_spec(m) is None]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if missing:
    sys.exit(f"missing here: {missing}; carry their wheels in .whl/ (scripts/gpu_wheels.sh)")
PY
set -o pipefail
timeout --signal=TERM --kill-after=20 "$budget" python3 scripts/gpu_check.py --out "$out" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
