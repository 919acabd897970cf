"""Seconds per denoising step of Reducio-DiT XL (random weights) at 256, 512 and 1024 px, on this machine.

One step = one CFG evaluation: cond and uncond batched (batch 2), ft4 latent (T' = 4), patch (1,1,1),
so 256 / 1024 / 4096 video tokens. A full 28-block forward is timed where it is affordable; otherwise
the model is built with 1 and 2 blocks and the step time extrapolated as t(1) + 27 * (t(2) - t(1))
(blocks are identical, so the per-block cost is exact up to timing noise). The analytic FLOPs follow
spec reducio_dit.md §9.1.

    python bench/bench_reducio_dit.py [--sizes 256 512 1024] [--full-max 256] [--repeats 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducio.dit import ReducioDiT, get_config  # noqa: E402


def flops_per_forward(cfg, tokens: int, context: int) -> float:
    d = cfg.hidden_size
    per_block = tokens * 14 * d * d + 2 * tokens * tokens * d + 2 * tokens * context * d + 2 * context * d * d
    return 2 * (cfg.depth * per_block + tokens * 48 * d)


def inputs(cfg, size: int, batch: int = 2):
    h = size // 32
    return dict(x=torch.randn(batch, 16, cfg.latent_frames, h, h), t=torch.full((batch,), 500.0),
                text=torch.randn(batch, 120, 4096), text_mask=torch.ones(batch, 120),
                clip=torch.randn(batch, 256, 1280), content=torch.randn(batch, 4, size // 8, size // 8))


@torch.no_grad()
def time_forward(depth: int, size: int, repeats: int) -> float:
    cfg = get_config("XL", depth=depth)
    model = ReducioDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():   # the from-scratch init zeroes some layers; any values do for timing
            p.normal_(0, 0.02)
    args = inputs(cfg, size)
    model(**args)                       # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(**args)
        best = min(best, time.perf_counter() - start)
    del model
    return best


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--full-max", type=int, default=256, help="largest size timed with all 28 blocks")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    xl = get_config("XL")
    rows = []
    for size in args.sizes:
        tokens = 4 * (size // 32) ** 2
        content = (size // 16) ** 2 // xl.groups_for_image(size, size)
        context = xl.text_tokens + xl.clip_tokens + content
        step_flops = 2 * flops_per_forward(xl, tokens, context)
        t1 = time_forward(1, size, args.repeats)
        t2 = time_forward(2, size, args.repeats)
        per_block = t2 - t1
        extrapolated = t1 + (xl.depth - 1) * per_block
        measured = time_forward(xl.depth, size, args.repeats) if size <= args.full_max else None
        row = {"size": size, "tokens": tokens, "context": context, "tflop_per_step": step_flops / 1e12,
               "s_1_block": t1, "s_2_blocks": t2, "s_per_block": per_block,
               "s_per_step_extrapolated": extrapolated, "s_per_step_measured_28_blocks": measured,
               "gflops_per_s": step_flops / (measured or extrapolated) / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "platform": platform.platform(), "processor": platform.processor()},
              "setting": "XL, patch (1,1,1), ft4 (T'=4), batch 2 (cond + uncond), float32, CPU, random weights",
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
