"""Window attention kernels vs full attention on CPU: time ratios side by side in one run.

For each sequence length the script times, on the same q/k/v:
  full      plain SDPA (the baseline, ratio 1.00)
  masked    SDPA with the window's boolean mask (the exact reference; costs full time)
  banded    fastattn's chunked kernel (what backend="auto" picks on CPU)
  flex      compiled FlexAttention with a block mask (--flex; compile time excluded)
for the official 1-D window (w = L/8 per side, ~1/4 of the keys) and a 2-D grid window
with the same kept share, and checks the fast kernels against the masked reference.

Absolute times are CPU figures on a shared machine and only the ratios within one run
mean something; on a GPU use flash-attn's window_size and time there.

    python bench/bench_fastattn_kernels.py                       # 1k..16k, markdown to stdout
    python bench/bench_fastattn_kernels.py --write bench/fastattn_kernels_results.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastattn.kernels import (  # noqa: E402
    banded_window_attention,
    default_block_size,
    flex_window_attention,
    masked_reference_window_attention,
)
from fastattn.windows import GridWindow, Window1D, grid_window_fraction, CallInfo  # noqa: E402


def interleaved_best_times(functions: dict, repeats: int) -> dict:
    """Best time of each function, timing them round-robin so that load changes on a
    shared machine hit every kernel alike (the ratios are what the bench reports)."""
    for fn in functions.values():
        fn()  # warm-up (allocations, lazy init, compilation)
    best = {name: float("inf") for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def grid_for(length: int):
    side = int(math.isqrt(length))
    if side * side == length:
        return (side, side)
    side = int(math.isqrt(length // 2))
    return (side, 2 * side)


def max_error_vs_reference(out, q, k, v, window, rows: int = 256) -> float:
    """Compare against the exact masked reference on a few query blocks (first, middle, last)."""
    length = q.shape[2]
    worst = 0.0
    for start in sorted({0, max(0, length // 2 - rows // 2), max(0, length - rows)}):
        index = torch.arange(start, min(length, start + rows))
        mask = window.row_mask(index, length)
        expected = F.scaled_dot_product_attention(q[:, :, index], k, v, attn_mask=mask)
        worst = max(worst, (out[:, :, index] - expected).abs().max().item())
    return worst


def bench(lengths, heads, dim, repeats, use_flex, masked_limit, flex_limit):
    rows = []
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        q, k, v = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
        reps = repeats if length <= 8192 else max(1, repeats - 2)
        w = length // 8
        grid = grid_for(length)
        windows = {
            f"1-D ({w}, {w})": Window1D(w, w),
            f"2-D grid {grid[0]}x{grid[1]}": grid_window_fraction(0.25)(CallInfo(0, 0, length, token_grid=grid)),
        }
        for label, window in windows.items():
            row = {"L": length, "window": label, "kept": window.kept_fraction(length)}
            functions = {
                "full": lambda: F.scaled_dot_product_attention(q, k, v),
                "banded": lambda: banded_window_attention(q, k, v, window),
            }
            if length <= masked_limit:
                functions["masked"] = lambda: masked_reference_window_attention(q, k, v, window)
            if use_flex and length <= flex_limit:
                start = time.perf_counter()
                out = flex_window_attention(q, k, v, window)
                row["flex_compile_s"] = time.perf_counter() - start
                row["err_flex"] = max_error_vs_reference(out, q, k, v, window)
                functions["flex"] = lambda: flex_window_attention(q, k, v, window)
            times = interleaved_best_times(functions, reps)
            row["full_s"] = times["full"]
            for name in ("banded", "masked", "flex"):
                if name in times:
                    row[name] = times[name] / times["full"]
            row["block"] = (
                "tiles " + "x".join(map(str, window.tile_shape())) if isinstance(window, GridWindow)
                else str(default_block_size(window, length))
            )
            row["err_banded"] = max_error_vs_reference(banded_window_attention(q, k, v, window), q, k, v, window)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


METHOD_ROWS = [
    ("full_attn (no residual)", "full_attn", False),
    ("full_attn + residual (W computed too)", "full_attn", True),
    ("residual_window_attn (WA-RS)", "residual_window_attn", False),
    ("full_attn+cfg_attn_share (ASC)", "full_attn+cfg_attn_share", False),
    ("residual_window_attn+cfg_attn_share", "residual_window_attn+cfg_attn_share", False),
    ("output_share (AST)", "output_share", False),
]


def bench_methods(length, heads, dim, repeats):
    """Per-call cost of each method through FastAttnRuntime on a CFG batch (1 cond + 1 uncond row)."""
    from fastattn.runtime import FastAttnRuntime

    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, length, dim, generator=generator) for _ in range(3))
    w = length // 8
    functions = {}
    for label, method, residual in METHOD_ROWS:
        runtime = FastAttnRuntime(
            lambda step, layer, m=method: "full_attn" if step == 0 else m,
            Window1D(w, w),
            needs_residual=lambda step, layer, r=residual: step == 0 or r,
        )
        runtime(q, k, v, layer=0, step=0, cfg_rows=[1, 0])  # step 0: full, fills the caches
        functions[label] = lambda rt=runtime: rt(q, k, v, layer=0, step=1, cfg_rows=[1, 0])
    times = interleaved_best_times(functions, repeats)
    base = times[METHOD_ROWS[0][0]]
    lines = [
        f"Per-call cost through `FastAttnRuntime` at L = {length}, CFG batch of 2 rows (uncond, cond), "
        f"{heads} heads, head dim {dim}, window ({w}, {w}); ratio to plain full attention:",
        "",
        "| method at this step | time (s) | ratio |",
        "| --- | ---: | ---: |",
    ]
    for label, _, _ in METHOD_ROWS:
        lines.append(f"| {label} | {times[label]:.3f} | {times[label] / base:.2f} |")
    return "\n".join(lines) + "\n"


def to_markdown(rows, args) -> str:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        "| L | window | kept pairs | full (s) | masked SDPA | banded (query block) | flex (compiled) | max err banded | max err flex |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['window']} | {r['kept']:.3f} | {r['full_s']:.3f} | {fmt(r.get('masked'), '.2f')} | "
            f"{r['banded']:.2f} ({r['block']}) | {fmt(r.get('flex'), '.2f')} | {r['err_banded']:.1e} | "
            f"{fmt(r.get('err_flex'), '.1e')} |"
        )
    header = (
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
        f"batch 1, {args.heads} heads, head dim {args.dim}, float32; best of {args.repeats} "
        f"(fewer above 8k), kernels timed round-robin. Ratios are kernel time / full SDPA time in the same run."
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 by default because on a shared machine multi-threaded timings of "
        "many small kernels are dominated by thread contention, not by the work",
    )
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile on CPU)")
    parser.add_argument("--flex-limit", type=int, default=4096, help="longest L for the flex timing (each shape compiles)")
    parser.add_argument("--masked-limit", type=int, default=8192, help="longest L for the masked-SDPA reference timing")
    parser.add_argument("--methods-length", type=int, default=4096, help="L of the per-method table (0 = skip)")
    parser.add_argument("--write", type=Path, help="write the markdown table to this file (atomically)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(args.lengths, args.heads, args.dim, args.repeats, args.flex, args.masked_limit, args.flex_limit)
    table = to_markdown(rows, args)
    if args.methods_length:
        table += "\n" + bench_methods(args.methods_length, args.heads, args.dim, args.repeats)
    print(table)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.write.parent, delete=False, suffix=".tmp") as handle:
            handle.write(table)
        os.replace(handle.name, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
