#!/usr/bin/env bash
# Install the two ComfyUI versions the test tiers run against, each with its own venv.
#
#   ~/comfy/ComfyUI          v0.8.0  (comfy-cli's default workspace; override with COMFYUI_PATH)
#   ~/comfy/ComfyUI-0.3.64   v0.3.64 (override with COMFYUI_0364_PATH)
#
# ComfyUI is not on PyPI. Where its source is missing this script extracts it from a local git
# mirror when one exists (COMFYUI_MIRROR / COMFYUI_0364_MIRROR); otherwise it says so loudly
# and the ComfyUI test tiers report that they could not run.
# Idempotent: a finished install is marked with .reducio_fastattn_setup_done and skipped.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "$0")/.." && pwd)"
COMFY_080="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
COMFY_0364="${COMFYUI_0364_PATH:-$HOME/comfy/ComfyUI-0.3.64}"
MIRROR_080="${COMFYUI_MIRROR:-/work/.mirror/pollockjj+ComfyUI/repo}"
MIRROR_0364="${COMFYUI_0364_MIRROR:-/work/.mirror/Comfy-Org+ComfyUI/repo}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

extract() {  # extract <mirror> <dest>
  local mirror="$1" dest="$2"
  if [ -f "$dest/main.py" ]; then return 0; fi
  if [ ! -d "$mirror" ]; then
    echo "!!! ComfyUI source missing at $dest and no mirror at $mirror: ComfyUI tiers cannot run !!!" >&2
    return 1
  fi
  mkdir -p "$dest"
  git -C "$mirror" archive HEAD -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' | tar -x -C "$dest"
}

install_venv() {  # install_venv <comfy dir>
  local dir="$1"
  if [ -f "$dir/.reducio_fastattn_setup_done" ]; then echo "ComfyUI at $dir: already set up"; return 0; fi
  [ -x "$dir/venv/bin/python" ] || "$PY" -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q --upgrade pip
  "$dir/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$dir/venv/bin/pip" install -q -r "$dir/requirements.txt"
  # requests: imported by app/frontend_management.py but missing from v0.8.0's requirements.
  "$dir/venv/bin/pip" install -q requests pytest websocket-client einops safetensors numpy
  touch "$dir/.reducio_fastattn_setup_done"
  echo "ComfyUI at $dir: set up"
}

status=0
if extract "$MIRROR_080" "$COMFY_080"; then install_venv "$COMFY_080" || status=1; else status=1; fi
# Each version gets its own venv, so v0.3.64 keeps its own pinned frontend and templates packages
# (it dies at start with 0.8.0's newer templates package).
if extract "$MIRROR_0364" "$COMFY_0364"; then install_venv "$COMFY_0364" || status=1; else status=1; fi
# comfy-cli in its own venv (`comfy node validate`, `comfy run --workflow`); tests use it when present.
CLI_VENV="${COMFY_CLI_VENV:-$HOME/comfy/cli-venv}"
if [ ! -x "$CLI_VENV/bin/comfy" ]; then
  "$PY" -m venv "$CLI_VENV" && "$CLI_VENV/bin/pip" install -q comfy-cli || status=1
fi
[ -x "$CLI_VENV/bin/comfy" ] && "$CLI_VENV/bin/comfy" --skip-prompt tracking disable >/dev/null 2>&1 || true
exit $status
