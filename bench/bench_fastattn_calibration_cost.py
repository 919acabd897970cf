"""Calibration cost of DiTFastAttn V1 (greedy, layer-wise) against V2 (head-wise, budget ILP), CPU.

Run:  PYTHONPATH=. python bench/bench_fastattn_calibration_cost.py [--layers 4 8 16] [--steps 10] [--out FILE]

Both searches drive the same tiny joint-attention transformer (built here, random weights,
[image; text] tokens with the text after the image as in SD3) through the same runtime seam
(`FastAttnRuntime` as the attention core of every layer), on one sampling run:

* V1 (`fastattn.calibration.calibrate_target`): per step 1 reference forward + one whole-model
  forward per candidate tried per layer (at most 4L) + the real forward. Its window is the
  official N/8 per side over the image tokens, text kept global.
* V2 (`fastattn.headwise.calibrate_headwise`): one forward per step; inside each layer one extra
  full attention and one arrow attention per arrow candidate, then a small ILP (scipy milp).

Reported: model forwards, wall seconds of the whole calibration, both relative to one plain
(uncompressed) sampling run, the plan's attention-core FLOPs kept (fastattn.flops) and the
final latent's relative error against the uncompressed run (same seed). Thresholds are not
matched budgets: this bench measures search cost, the quality curves are a separate task.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from fastattn.calibration import SteppedRuntimeTarget, calibrate_target
from fastattn.flops import AttentionShape, headwise_plan_cost, plan_cost
from fastattn.headwise import calibrate_headwise
from fastattn.plan import FULL
from fastattn.runtime import FastAttnRuntime
from fastattn.windows import Window1D


class TinyJointDiT(torch.nn.Module):
    """L joint-attention blocks (pre-norm attention + MLP, timestep added to the tokens)."""

    def __init__(self, layers: int, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.time = torch.nn.Linear(1, dim)
        self.norm1 = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.norm2 = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
            for _ in range(layers))

    @property
    def num_layers(self) -> int:
        return len(self.qkv)

    def forward(self, x, text, t, runtime, step):
        image_tokens = x.shape[1]
        h = torch.cat([x, text], dim=1) + self.time(t.view(1, 1, 1))
        for i in range(self.num_layers):
            q, k, v = self.qkv[i](self.norm1[i](h)).chunk(3, dim=-1)
            attended = runtime(q, k, v, layer=i, step=step, heads=self.heads, layout="blc",
                               suffix_tokens=text.shape[1])
            h = h + self.proj[i](attended)
            h = h + self.mlp[i](self.norm2[i](h))
        return h[:, :image_tokens]


class Sampler:
    """Euler steps x <- x - dt * model(x, t) from fixed noise; counts model forwards."""

    def __init__(self, model, steps, image_tokens, text_tokens, dim, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.model, self.steps = model, steps
        self.x0 = torch.randn(2, image_tokens, dim, generator=generator)
        self.text = torch.randn(2, text_tokens, dim, generator=generator)
        self.forwards = 0

    def forward(self, x, step, runtime):
        self.forwards += 1
        t = torch.tensor(1.0 - step / self.steps)
        return self.model(x, self.text, t, runtime, step)

    def run(self, runtime):
        x = self.x0
        with torch.no_grad():
            for step in range(self.steps):
                x = x - (1.0 / self.steps) * self.forward(x, step, runtime)
        return x


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def bench(layers: int, steps: int, side: int, text: int, dim: int, heads: int, delta: float, alpha: float):
    torch.manual_seed(0)
    model = TinyJointDiT(layers, dim, heads).eval()
    image = side * side
    full_runtime = FastAttnRuntime(lambda s, l: FULL, None, needs_residual=lambda s, l: False)
    plain = Sampler(model, steps, image, text, dim)
    plain_times = []
    for _ in range(3):  # the shared CPU is noisy: the best of three plain runs is the unit
        started = time.perf_counter()
        reference = plain.run(full_runtime)
        plain_times.append(time.perf_counter() - started)
    plain_seconds = min(plain_times)

    window = Window1D(image // 8, image // 8, suffix_tokens=text)
    v1_sampler = Sampler(model, steps, image, text, dim)
    latent = {"x": v1_sampler.x0}

    def advance(step, out):
        latent["x"] = latent["x"] - (1.0 / steps) * out

    target = SteppedRuntimeTarget(layers, steps, window=window, advance=advance,
                                  model_output=lambda step, runtime: v1_sampler.forward(latent["x"], step, runtime))
    started = time.perf_counter()
    with torch.no_grad():
        search = calibrate_target(target, delta)
    v1_seconds = time.perf_counter() - started
    v1_plan = search.to_plan({"window": [image // 8] * 2})
    v1_final = latent["x"]
    shape = AttentionShape(tokens=image + text, heads=heads, head_dim=dim // heads, rows=2, cfg=False,
                           window=window)
    v1_cost = plan_cost(v1_plan, shape)

    sampler = Sampler(model, steps, image, text, dim)
    finals = []
    started = time.perf_counter()
    calibration = calibrate_headwise(lambda runtime: finals.append(sampler.run(runtime)),
                                     list(range(layers)), steps, alpha)
    v2_seconds = time.perf_counter() - started
    v2_plan = calibration.to_plan(token_grid=[side, side])
    v2_cost = headwise_plan_cost(v2_plan, rows=2)
    return {
        "layers": layers, "steps": steps, "image_tokens": image, "text_tokens": text, "dim": dim,
        "heads": heads, "plain_run_s": plain_seconds,
        "v1": {"threshold": delta, "forwards": v1_sampler.forwards, "wall_s": v1_seconds,
               "forwards_per_step": v1_sampler.forwards / steps,
               "x_plain_run": v1_seconds / plain_seconds, "core_flops_kept": v1_cost.core_fraction,
               "final_rel_error": relative_error(v1_final, reference), "methods": v1_plan.method_counts()},
        "v2": {"alpha": alpha, "forwards": sampler.forwards, "wall_s": v2_seconds,
               "forwards_per_step": sampler.forwards / steps, "x_plain_run": v2_seconds / plain_seconds,
               "search_s_inside_attention": calibration.seconds, "ilp_s": calibration.ilp_seconds, "core_flops_kept": v2_cost.core_fraction,
               "final_rel_error": relative_error(finals[0], reference), "methods": v2_plan.method_counts()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--side", type=int, default=16, help="image token grid side (16 -> 256 tokens)")
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--delta", type=float, default=0.15, help="V1 threshold")
    parser.add_argument("--alpha", type=float, default=0.1, help="V2 error budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by a shared CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench(1, 2, 4, 4, 16, 2, args.delta, args.alpha)  # warm-up: imports, SciPy/HiGHS, kernel caches
    results = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads", "runs": []}
    print("| L | T | plain run s | V1 forwards (/step) | V1 s (x plain run) | V2 forwards (/step) | V2 s (x plain run) "
          "| of which V2 search / ILP s | V1 / V2 time | core FLOPs kept V1 / V2 | final rel. error V1 / V2 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layers in args.layers:
        r = bench(layers, args.steps, args.side, args.text, args.dim, args.heads, args.delta, args.alpha)
        results["runs"].append(r)
        v1, v2 = r["v1"], r["v2"]
        print(f"| {layers} | {args.steps} | {r['plain_run_s']:.2f} | {v1['forwards']} ({v1['forwards_per_step']:.1f}) | "
              f"{v1['wall_s']:.2f} ({v1['x_plain_run']:.1f}x) | {v2['forwards']} ({v2['forwards_per_step']:.1f}) | "
              f"{v2['wall_s']:.2f} ({v2['x_plain_run']:.1f}x) | {v2['search_s_inside_attention']:.2f} / "
              f"{v2['ilp_s']:.2f} | {v1['wall_s'] / v2['wall_s']:.1f} | "
              f"{v1['core_flops_kept']:.2f} / {v2['core_flops_kept']:.2f} | "
              f"{v1['final_rel_error']:.2e} / {v2['final_rel_error']:.2e} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=lambda o: o if not math.isnan(o) else None))


if __name__ == "__main__":
    main()
