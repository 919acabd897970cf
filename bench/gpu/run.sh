#!/usr/bin/env bash
# One prepared GPU run: checks + benchmarks, one JSON of results (see bench/gpu/README.md).
#
#   bash bench/gpu/run.sh            # on the GPU machine: bench/gpu_results.json (+ $OUT/ when set)
#   bash bench/gpu/run.sh --smoke    # tiny sizes on the CPU, same code paths (tier-1 test)
#
# Python: $PYTHON if set, else the first of python3 / .venv/bin/python that imports torch (on the
# GPU machine that is the image's python3 with its CUDA torch; the pack's .venv is a CPU build and a
# link that does not travel). Extra arguments go to `python -m bench.gpu`.
set -euo pipefail
cd "$(dirname "$0")/../.."

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    for candidate in python3 .venv/bin/python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            echo "$candidate"; return
        fi
    done
    echo "bench/gpu/run.sh: no Python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
}
PY="$(pick_python)"

args=("$@")
smoke=0
for a in "$@"; do [[ "$a" == "--smoke" ]] && smoke=1; done
has_out=0
for a in "$@"; do [[ "$a" == --out* ]] && has_out=1; done
if [[ $has_out == 0 && $smoke == 0 ]]; then
    args+=(--out bench/gpu_results.json)
    # On the device machine only what lands under $OUT comes back: write the JSON there as well.
    if [[ -n "${OUT:-}" ]]; then
        args+=(--out "$OUT/gpu_results.json")
        exec > >(tee -a "$OUT/gpu_bench.log") 2>&1   # the whole log comes back too
    fi
fi

export PYTHONUNBUFFERED=1
# The suite keeps itself under its own 450 s budget; this hard stop (SIGINT, so the JSON written so
# far is closed cleanly) keeps a hung kernel from eating the rest of a 15-minute device lease.
limit="${GPU_BENCH_HARD_LIMIT_S:-480}"
[[ $smoke == 1 ]] && limit="${GPU_BENCH_HARD_LIMIT_S:-300}"
exec timeout -s INT -k 15 "$limit" "$PY" -m bench.gpu "${args[@]}"
