"""End-to-end DiTFastAttn on a small DiT (CPU): patched vs unpatched wall time beside the
corrected FLOPs fractions and the Amdahl bound from the measured attention share.

Run:  python bench/bench_fastattn_e2e.py [--tokens-side 32] [--steps 10] [--repeats 3]

The model is a randomly initialised diffusers DiTTransformer2DModel (no weights are downloaded)
with few channels and many tokens, so that self-attention is a large part of the run, as it is
for real DiTs at high resolution. Random weights change little between steps, so calibrated
plans are AST-heavy; fixed plans ("WA-RS everywhere", "ASC everywhere") are timed as well.
CPU figures: compare ratios within one run; absolute times mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import (AutoencoderKL, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler)

from fastattn.flops import AttentionShape, amdahl_speedup_bound, plan_cost  # noqa: E402
from fastattn.integrations.diffusers import (apply_plan, calibrate,  # noqa: E402
                                             measure_attention_share)
from fastattn.plan import ASC, AST, FULL, WARS, Plan  # noqa: E402


def build_pipeline(latent_side: int, layers: int, heads: int, head_dim: int) -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=latent_side, patch_size=2, num_embeds_ada_norm=1000,
        attention_bias=True, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        norm_eps=1e-5, activation_fn="gelu-approximate").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], block_out_channels=[8],
                        layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=latent_side).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_run(pipe, plan, kwargs, steps) -> tuple[float, list[float]]:
    """Wall time of one pipeline call and the wall time of each transformer forward in it."""
    forwards: list[float] = []
    marks: list[float] = []
    pre = pipe.transformer.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter()))
    post = pipe.transformer.register_forward_hook(
        lambda *_: forwards.append(time.perf_counter() - marks[-1]))
    try:
        started = time.perf_counter()
        if plan is None:
            pipe(**kwargs, num_inference_steps=steps, generator=torch.manual_seed(0),
                 output_type="np")
        else:
            with apply_plan(pipe.transformer, plan):
                pipe(**kwargs, num_inference_steps=steps, generator=torch.manual_seed(0),
                     output_type="np")
        return time.perf_counter() - started, forwards
    finally:
        pre.remove()
        post.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-side", type=int, default=64, help="latent H=W (tokens = (side/2)^2)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.latent_side, args.layers, args.heads, args.head_dim)
    kwargs = dict(class_labels=[207], guidance_scale=4.0)
    tokens = (args.latent_side // 2) ** 2
    window = (tokens // 8, tokens // 8)
    shape = AttentionShape(tokens=tokens, heads=args.heads, head_dim=args.head_dim, rows=2,
                           cfg=True, window=window)

    started = time.perf_counter()
    calibrated = {thr: calibrate(pipe, threshold=thr, window=window,
                                 num_inference_steps=args.steps, **kwargs)
                  for thr in args.thresholds}
    calibration_seconds = time.perf_counter() - started

    first_full = [[FULL] * args.layers]
    rest = args.steps - 1
    plans = {
        "unpatched": None,
        "all full (patched)": Plan(first_full * args.steps, {"window": list(window)}),
        "WA-RS after step 0": Plan(first_full + [[WARS] * args.layers] * rest,
                                   {"window": list(window)}),
        "ASC after step 0": Plan(first_full + [[ASC] * args.layers] * rest,
                                 {"window": list(window)}),
        "AST after step 0": Plan(first_full + [[AST] * args.layers] * rest,
                                 {"window": list(window)}),
    }
    plans.update({f"calibrated d={thr:g}": plan for thr, plan in calibrated.items()})
    share = statistics.median(
        measure_attention_share(pipe, **kwargs, num_inference_steps=args.steps,
                                generator=torch.manual_seed(0), output_type="np")
        for _ in range(3))

    timed_run(pipe, None, kwargs, args.steps)  # warm-up
    times = {name: [] for name in plans}
    forward_times = {name: [] for name in plans}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, plan in plans.items():
            total, forwards = timed_run(pipe, plan, kwargs, args.steps)
            times[name].append(total)
            forward_times[name].append(forwards)
    # the minimum over interleaved repeats is the least disturbed by other processes on a shared
    # machine; the median is reported beside it. "Transformer time" sums, per step, the fastest
    # of the repeats of that step's forward: robust to interference spikes within a run.
    base = min(times["unpatched"])

    def transformer_time(name: str) -> float:
        return sum(min(run[t] for run in forward_times[name]) for t in range(args.steps))

    base_forwards = transformer_time("unpatched")

    rows = []
    for name, plan in plans.items():
        best = min(times[name])
        row = {"plan": name, "min_s": round(best, 4),
               "median_s": round(statistics.median(times[name]), 4),
               "time_ratio": round(best / base, 3),
               "transformer_ratio": round(transformer_time(name) / base_forwards, 3)}
        if plan is not None:
            cost = plan_cost(plan, shape)
            row.update(core_fraction=round(cost.core_fraction, 3),
                       module_fraction=round(cost.module_fraction, 3),
                       amdahl_bound_ratio=round(1 / amdahl_speedup_bound(share,
                                                                        cost.module_fraction), 3),
                       counts=plan.method_counts())
        rows.append(row)

    header = (f"DiT {args.layers} layers, {args.heads}x{args.head_dim} heads, {tokens} tokens, "
              f"window {window[0]}/side, {args.steps} DPM-Solver++ steps, CFG batch 2, "
              f"{args.threads} thread(s), {args.repeats} interleaved repeats (ratio of minima)")
    print(header)
    print(f"measured self-attention share of the unpatched run (median of 3): {share:.3f}; "
          f"{len(calibrated)} calibration(s) took {calibration_seconds:.1f} s")
    print("| plan | min time (s) | median (s) | time ratio | transformer time ratio | "
          "core FLOPs kept | module FLOPs kept | Amdahl bound ratio | methods |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['plan']} | {row['min_s']:.3f} | {row['median_s']:.3f} | "
              f"{row['time_ratio']:.3f} | {row['transformer_ratio']:.3f} | "
              f"{row.get('core_fraction', 1.0):.3f} | {row.get('module_fraction', 1.0):.3f} | "
              f"{row.get('amdahl_bound_ratio', 1.0):.3f} | "
              f"{', '.join(f'{k} {v}' for k, v in row.get('counts', {}).items()) or '-'} |")
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "attention_share": share,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
