#!/usr/bin/env bash
# The pack's own venv (.venv) for the pure tier-1 tests, training and the benchmarks: small CPU torch
# wheel, the package deps, the test extra (diffusers for the DiTFastAttn parity harness) and the train
# extra (PyAV, scikit-image). Idempotent: the installed package list is remembered in
# .venv/.deps_done, and a changed list (a newer checkout needing more packages) installs again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
PACKAGES="einops safetensors numpy pillow scipy pytest ruff diffusers==0.31.0 transformers<5 accelerate av scikit-image"
wanted="$TORCH $PACKAGES"
if [ ! -f .venv/.deps_done ] || [ "$(cat .venv/.deps_done)" != "$wanted" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "$TORCH"
  # shellcheck disable=SC2086  # the list is split into package specifiers on purpose
  .venv/bin/pip install -q $PACKAGES
  echo "$wanted" > .venv/.deps_done
fi
echo "dev venv ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
