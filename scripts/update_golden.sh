#!/usr/bin/env bash
# Refresh the repository's copy of the golden data (tests/golden) from a newer delivery of it
# (by default ../shared/golden beside the checkout; pass another folder as $1), then rewrite
# tests/golden/SHA256SUMS. Review `git diff --stat tests/golden` and run the tests afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/golden}"
[ -d "$SRC/fastattn" ] && [ -d "$SRC/reducio" ] || { echo "no golden data (fastattn/, reducio/) in $SRC" >&2; exit 2; }
for part in fastattn reducio; do
  mkdir -p "tests/golden/$part"
  # data files only: the delivery's own READMEs stay there; tests/golden/README.md is ours
  find "$SRC/$part" -maxdepth 1 -type f ! -name 'README*' -exec cp -f {} "tests/golden/$part/" \;
done
chmod -R u+w tests/golden
( cd tests/golden && find fastattn reducio -type f | LC_ALL=C sort | xargs sha256sum > SHA256SUMS )
echo "tests/golden updated from $SRC; $(wc -l < tests/golden/SHA256SUMS) files listed in SHA256SUMS"
