#!/usr/bin/env bash
# The pack's own venv (.venv) for the pure tier-1 tests and the benchmarks: small CPU torch wheel,
# the package deps and the test extra (diffusers for the DiTFastAttn parity harness). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -f .venv/.deps_done ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q einops safetensors numpy scipy pytest "diffusers==0.31.0" "transformers<5" accelerate
  touch .venv/.deps_done
fi
echo "dev venv ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
