#!/usr/bin/env bash
# Install the two ComfyUI versions the test tiers run against, each with its own venv.
#
#   ~/comfy/ComfyUI          v0.8.0  (comfy-cli's default workspace; override with COMFYUI_PATH)
#   ~/comfy/ComfyUI-0.3.64   v0.3.64 (override with COMFYUI_0364_PATH)
#
# ComfyUI is not on PyPI. Where a checkout is missing, the source comes from, in this order:
#   1. a local git mirror named by COMFYUI_MIRROR (for v0.8.0) / COMFYUI_0364_MIRROR (for v0.3.64):
#      for offline machines; its HEAD is extracted as is;
#   2. otherwise a shallow clone of the official repository (COMFYUI_REPO, default
#      https://github.com/Comfy-Org/ComfyUI.git) at the release tag v0.8.0 / v0.3.64.
# The script says which source it used and checks the version of what it got.
# Idempotent: a finished install is marked with .reducio_fastattn_setup_done and skipped.
# COMFYUI_SOURCE_ONLY=1 gets the sources only (no venvs, no comfy-cli).
set -euo pipefail

COMFY_080="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
COMFY_0364="${COMFYUI_0364_PATH:-$HOME/comfy/ComfyUI-0.3.64}"
REPO_URL="${COMFYUI_REPO:-https://github.com/Comfy-Org/ComfyUI.git}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

installed_version() {  # installed_version <dir>
  sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null
}

get_source() {  # get_source <version> <dest> <mirror or empty>
  local version="$1" dest="$2" mirror="$3"
  if [ -f "$dest/main.py" ]; then
    echo "ComfyUI $version: using the existing checkout at $dest"
  elif [ -n "$mirror" ]; then
    if [ ! -d "$mirror" ]; then
      echo "!!! ComfyUI $version: the mirror $mirror given by the environment does not exist !!!" >&2
      return 1
    fi
    echo "ComfyUI $version: extracting HEAD of the local mirror $mirror into $dest"
    mkdir -p "$dest"
    # The Llama tokenizer is a large file a mirror may leave out; nothing here uses it.
    git -C "$mirror" archive HEAD -- . ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' \
      | tar -x -C "$dest"
  else
    echo "ComfyUI $version: cloning tag v$version of $REPO_URL into $dest"
    if ! git clone -q --depth 1 --branch "v$version" "$REPO_URL" "$dest"; then
      echo "!!! ComfyUI $version: could not clone $REPO_URL (offline? set COMFYUI_MIRROR / COMFYUI_0364_MIRROR to a local mirror) !!!" >&2
      return 1
    fi
  fi
  local got; got="$(installed_version "$dest")"
  if [ "$got" != "$version" ]; then
    echo "!!! ComfyUI at $dest is version '${got:-unknown}', expected $version: tests would run against the wrong version !!!" >&2
    return 1
  fi
}

# Test, training and pack packages added to each ComfyUI venv (requests: imported by
# app/frontend_management.py but missing from v0.8.0's requirements; scikit-image: the synthetic
# training and evaluation clips).
EXTRAS="requests pytest websocket-client einops safetensors numpy scipy scikit-image"

install_venv() {  # install_venv <comfy dir>
  local dir="$1" marker="$1/.reducio_fastattn_setup_done"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$EXTRAS" ]; then echo "ComfyUI at $dir: venv already set up"; return 0; fi
  [ -x "$dir/venv/bin/python" ] || "$PY" -m venv "$dir/venv"
  if [ ! -f "$marker" ]; then
    "$dir/venv/bin/pip" install -q --upgrade pip
    "$dir/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$dir/venv/bin/pip" install -q -r "$dir/requirements.txt"
  fi
  # shellcheck disable=SC2086  # one specifier per word
  "$dir/venv/bin/pip" install -q $EXTRAS
  echo "$EXTRAS" > "$marker"
  echo "ComfyUI at $dir: venv set up"
}

status=0
if [ "${COMFYUI_SOURCE_ONLY:-0}" = "1" ]; then
  get_source 0.8.0 "$COMFY_080" "${COMFYUI_MIRROR:-}" || status=1
  get_source 0.3.64 "$COMFY_0364" "${COMFYUI_0364_MIRROR:-}" || status=1
  exit $status
fi
if get_source 0.8.0 "$COMFY_080" "${COMFYUI_MIRROR:-}"; then install_venv "$COMFY_080" || status=1; else status=1; fi
# Each version gets its own venv, so v0.3.64 keeps its own pinned frontend and templates packages
# (it dies at start with 0.8.0's newer templates package).
if get_source 0.3.64 "$COMFY_0364" "${COMFYUI_0364_MIRROR:-}"; then install_venv "$COMFY_0364" || status=1; else status=1; fi
# comfy-cli in its own venv (`comfy node validate`, `comfy run --workflow`); tests use it when present.
CLI_VENV="${COMFY_CLI_VENV:-$HOME/comfy/cli-venv}"
if [ ! -x "$CLI_VENV/bin/comfy" ]; then
  "$PY" -m venv "$CLI_VENV" && "$CLI_VENV/bin/pip" install -q comfy-cli || status=1
fi
[ -x "$CLI_VENV/bin/comfy" ] && "$CLI_VENV/bin/comfy" --skip-prompt tracking disable >/dev/null 2>&1 || true
exit $status
