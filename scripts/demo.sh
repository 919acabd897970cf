#!/usr/bin/env bash
# Main job: run every example workflow headless through ComfyUI's HTTP API with this pack loaded.
# Usage: bash scripts/demo.sh [--models /path/to/ComfyUI/models] [--only NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
if [ ! -x "$COMFY/venv/bin/python" ]; then
  echo "ComfyUI is not installed at $COMFY: run scripts/setup_comfyui.sh first" >&2
  exit 2
fi
COMFYUI_PATH="$COMFY" exec "$COMFY/venv/bin/python" -m scripts.demo "$@"
