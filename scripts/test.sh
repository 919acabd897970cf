#!/usr/bin/env bash
# Runs every test tier and says what ran.
#   tier 1 (tests/unit)   in the pack's .venv, no ComfyUI
#   tier 2 (tests/comfy)  in-process, once per installed ComfyUI, with that ComfyUI's venv
#   tier 3 (tests/server) a real headless server, likewise
# ComfyUI installs: COMFYUI_PATHS (space-separated) or ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.3.64.
# A missing ComfyUI fails the run loudly unless REDUCIO_ALLOW_NO_COMFYUI=1.
# Extra arguments go to every pytest call (e.g. -k wan, -x).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_dev.sh || exit 1
RESULTS=build/test-results
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
status=0

echo "=== lint: ruff (rules in pyproject.toml) ==="
if .venv/bin/ruff check .; then echo "lint: clean"; else echo "!!! lint failed: fix the findings above !!!"; status=1; fi

echo "=== tier 1: pure unit tests (.venv) ==="
.venv/bin/python -m pytest tests/unit -q -p no:cacheprovider --junitxml="$RESULTS/tier1.xml" "$@" || status=1

# The browser tier (tests/server/test_browser_workflows.py) loads every UI workflow in the real web
# frontend (Debian Chromium + playwright-core). It is required unless REDUCIO_ALLOW_NO_BROWSER=1.
if [ "${REDUCIO_ALLOW_NO_BROWSER:-0}" != "1" ]; then
  bash scripts/setup_browser.sh || echo "!!! browser setup failed: the browser tier will fail, see above !!!"
  export REDUCIO_REQUIRE_BROWSER=1
fi

COMFYS="${COMFYUI_PATHS:-$HOME/comfy/ComfyUI $HOME/comfy/ComfyUI-0.3.64}"
found=0
for comfy in $COMFYS; do
  if [ ! -f "$comfy/main.py" ] || [ ! -x "$comfy/venv/bin/python" ]; then
    echo "!!! ComfyUI not installed at $comfy (run scripts/setup_comfyui.sh): tiers 2-3 NOT run for it !!!"
    continue
  fi
  found=$((found + 1))
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py")
  echo "=== tiers 2-3 against ComfyUI $version at $comfy ==="
  overlay=""; [ -d "$comfy/overlay" ] && overlay="$comfy/overlay"
  PYTHONPATH="$overlay" COMFYUI_PATH="$comfy" REDUCIO_REQUIRE_COMFYUI=1 \
    "$comfy/venv/bin/python" -m pytest tests/comfy tests/server -q -p no:cacheprovider \
    --junitxml="$RESULTS/comfyui-$version.xml" "$@" || status=1
done
if [ "$found" -eq 0 ]; then
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! NO ComfyUI FOUND: test tiers 2 (in-process) and 3 (server) DID NOT RUN  !!!"
  echo "!!! Install with: bash scripts/setup_comfyui.sh                              !!!"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  [ "${REDUCIO_ALLOW_NO_COMFYUI:-0}" = "1" ] || status=1
fi
.venv/bin/python scripts/summarize_tests.py "$RESULTS" || status=1
exit $status
