#!/usr/bin/env bash
# Set up the browser test tier (tests/server/test_browser_workflows.py): Debian's Chromium and
# playwright-core (the driver library only; it never downloads a browser of its own).
# Idempotent: does nothing that is already done. Needs root for apt-get (CI and dev machines are root).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$repo_root/tests/browser"

if [ ! -x /usr/bin/chromium ]; then
    echo "[setup_browser] installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    # apt-cache knows nothing before the first update on a fresh machine.
    if ! apt-cache show chromium >/dev/null 2>&1; then
        apt-get update -qq
    fi
    apt-get install -y -qq chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
fi
/usr/bin/chromium --version

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "[setup_browser] installing Debian nodejs + npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nodejs npm >/dev/null
fi
echo "node $(node --version)"

if [ ! -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
    echo "[setup_browser] npm ci playwright-core into tests/browser/node_modules"
    # playwright-core ships no browser and downloads none on install.
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
node -e "console.log('playwright-core ' + require('$browser_dir/node_modules/playwright-core/package.json').version)"
