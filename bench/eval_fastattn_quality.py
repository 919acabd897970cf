"""DiTFastAttn quality on a trained DiT: attention FLOPs kept against PSNR / SSIM versus full attention.

Run:  python -m bench.eval_fastattn_quality [--out bench/fastattn_quality] [--steps 50]

The model is `bench/models/image_dit_64px.safetensors` (`bench.image_dit`, trained here by
`bench.image_dit_train`): 64x64 RGB, 1,024 image tokens, 6 layers x 4 heads, class-conditional,
DDIM with CFG (cond and uncond in one batch). Every variant runs through fastattn's
`FastAttnRuntime` as the model's attention core (the seam ComfyUI's override uses):

* **V1** (layer-wise, greedy, official candidates AST / WA-RS+ASC / WA-RS / ASC, window N/8 per
  side): one calibration per threshold delta (`fastattn.calibration.calibrate_target`).
* **V2** (head-wise arrow attention + head caching, budget ILP, official SD3 candidates): one
  calibration per error budget alpha (the official mode) and per budget on the attention work each
  (layer, step) may keep (`fastattn.headwise.calibrate_headwise`, `alpha=` / `flops_kept=`).
* **V2+** (`--v2plus-alphas` / `--v2plus-budgets`): the same head-wise ILP with WA-RS per head
  added to the candidates (`fastattn.headwise.RESIDUAL_CANDIDATES`; residual band = arrow factor
  `--residual-factor`; `--v2plus-candidates` takes another set, e.g. with ASC per head).

Plans are calibrated on `--calibration-images` images and evaluated on `--images` other images
(other classes and start noise): each compressed run's images against the full-attention run's
images from the same noise (PSNR, SSIM on [0, 1]), beside the plan's attention-core FLOPs kept
(`fastattn.flops`), the CPU time of the sampling run relative to full attention and the Amdahl
bound from the measured attention-core share. V1 and V2 are compared at equal FLOPs by linear
interpolation of V1's curve. Writes <out>.json, <out>.png (curves), <out>_sheet.png (images) and
<out>_map_v1.png / <out>_map_v2.png (method maps of the plans nearest 35 % FLOPs kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench.image_dit_train import SHIPPED, DDIMSampler, load_model
from fastattn.calibration import SteppedRuntimeTarget, calibrate_target
from fastattn.flops import AttentionShape, headwise_plan_cost, plan_cost
from fastattn.headwise import OFFICIAL_CANDIDATES, RESIDUAL_CANDIDATES, calibrate_headwise, runtime_for_plan
from fastattn.plan import Plan
from fastattn.runtime import (CfgRows, FastAttnRuntime, methods_from_table, output_cache_lookahead_from_table,
                              residual_lookahead_from_table)
from fastattn.windows import Window1D
from reducio.metrics import psnr, ssim

GOAL_FLOPS, GOAL_SSIM = 0.35, 0.95


def runtime_attend(runtime: FastAttnRuntime, grid: int):
    """attend_for(step, rows) for `DDIMSampler`: the model's attention core through `runtime`."""
    def attend_for(step: int, rows: int):
        cfg_rows = CfgRows.cond_first(rows)

        def attend(q, k, v, *, layer, heads):
            return runtime(q, k, v, layer=layer, step=step, heads=heads, layout="blc", cfg_rows=cfg_rows,
                           token_grid=(grid, grid))
        return attend
    return attend_for


class TimedAttention:
    """Plain SDPA attention core that sums its own wall time (the attention share of a full run)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, step: int, rows: int):
        def attend(q, k, v, *, layer, heads):
            started = time.perf_counter()
            b, n, c = q.shape
            q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            self.seconds += time.perf_counter() - started
            return out
        return attend


def v1_runtime(plan: Plan, window: Window1D) -> FastAttnRuntime:
    table = [plan.layer_methods(i) for i in range(plan.num_layers)]
    return FastAttnRuntime(methods_from_table(table), window, needs_residual=residual_lookahead_from_table(table),
                           cache_output=output_cache_lookahead_from_table(table))


def image_batch(count: int, classes: int, seed: int, first_class: int, size: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([(first_class + i) % classes for i in range(count)])
    return labels, torch.randn(count, 3, size, size, generator=generator)


def as_video(images: torch.Tensor) -> torch.Tensor:
    return images[:, :, None]   # [B, 3, 1, H, W]: reducio.metrics measures clips


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def evaluate(model, labels, noise, steps, cfg, make_attend_for, reference, repeats):
    """Sample with a fresh attention core per run (`make_attend_for()` -> attend_for or None);
    the images of the last run, its fastest wall time and, given `reference`, PSNR / SSIM."""
    sampler = DDIMSampler(model, labels, noise, steps, cfg)
    seconds = []
    for _ in range(repeats):
        attend_for = make_attend_for()
        started = time.perf_counter()
        images = sampler.run(attend_for)
        seconds.append(time.perf_counter() - started)
    quality = {}
    if reference is not None:
        scores = {"psnr": psnr(as_video(reference), as_video(images)),
                  "ssim": ssim(as_video(reference), as_video(images))}
        for name, values in scores.items():
            quality[name] = float(values.mean())
            quality[f"{name}_min"] = float(values.min())
    return images, min(seconds), quality


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Two panels (SSIM, PSNR against attention FLOPs kept), V1 and V2, the goal marked. PIL only."""
    from PIL import Image, ImageDraw
    from fastattn.report import _font

    font, small = _font(15), _font(12)
    panel_w, panel_h, margin = 460, 330, 60
    image = Image.new("RGB", (2 * panel_w + 40, panel_h + 160), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), title, fill=(20, 20, 20), font=font)
    # (label, colour, rows, joined by a line): V2+ with the error budget drawn apart from its
    # FLOPs-budget curve (the two modes choose very differently)
    series = [("V1 layer-wise (greedy)", (31, 119, 180), [r for r in rows if r["version"] == "V1"], True),
              ("V2 head-wise (ILP)", (230, 110, 20), [r for r in rows if r["version"] == "V2"], True),
              ("V2+ (WA-RS per head too), FLOPs budget", (40, 160, 60),
               [r for r in rows if r["version"] == "V2+" and "flops_budget" in r], True),
              ("V2+, error budget alpha", (150, 210, 150),
               [r for r in rows if r["version"] == "V2+" and "alpha" in r], False),
              ("V2+ with ASC per head too, FLOPs budget", (170, 60, 170),
               [r for r in rows if r["version"] == "V2+ASC" and "flops_budget" in r], True)]
    series = [s for s in series if s[2]]
    panels = [("ssim", "SSIM vs full attention", (min(0.8, min(r["ssim"] for r in rows) - 0.01), 1.0)),
              ("psnr", "PSNR vs full attention (dB)", (min(20.0, min(r["psnr"] for r in rows) - 1),
                                                      max(r["psnr"] for r in rows) + 2))]
    for p, (key, label, (lo, hi)) in enumerate(panels):
        x0, y0 = 20 + p * (panel_w + 20) + margin, 50
        w, h = panel_w - margin - 10, panel_h - 40

        def at(fx, fy):
            return x0 + fx * w, y0 + h - (fy - lo) / (hi - lo) * h

        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=(60, 60, 60))
        for i in range(6):
            fx = i / 5
            draw.line([at(fx, lo), (at(fx, lo)[0], at(fx, lo)[1] + 4)], fill=(60, 60, 60))
            draw.text((at(fx, lo)[0] - 10, y0 + h + 6), f"{fx:.1f}", fill=(40, 40, 40), font=small)
            fy = lo + (hi - lo) * i / 5
            draw.text((x0 - 48, at(0, fy)[1] - 7), f"{fy:.2f}" if key == "ssim" else f"{fy:.1f}",
                      fill=(40, 40, 40), font=small)
        draw.text((x0 + w / 2 - 110, y0 + h + 24), "attention-core FLOPs kept (fraction of full)",
                  fill=(20, 20, 20), font=small)
        draw.text((x0, y0 - 20), label, fill=(20, 20, 20), font=font)
        gx = at(GOAL_FLOPS, lo)[0]
        draw.line([(gx, y0), (gx, y0 + h)], fill=(150, 150, 150), width=1)
        if key == "ssim" and lo < GOAL_SSIM:
            gy = at(0, GOAL_SSIM)[1]
            draw.line([(x0, gy), (x0 + w, gy)], fill=(150, 150, 150), width=1)
            draw.text((x0 + 4, gy + 3), "goal: SSIM >= 0.95 at <= 35 % FLOPs", fill=(110, 110, 110), font=small)
        for _, colour, members, joined in series:
            points = sorted((r["core_flops_kept"], r[key]) for r in members)
            xy = [at(fx, min(max(fy, lo), hi)) for fx, fy in points]
            if joined and len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour if joined else None, outline=colour,
                             width=2)
    for i, (label, colour, _, joined) in enumerate(series):   # one legend under both panels
        lx, ly = 80 + (i % 2) * (panel_w + 20), panel_h + 80 + 20 * (i // 2)
        if joined:
            draw.line([(lx, ly + 7), (lx + 24, ly + 7)], fill=colour, width=3)
        else:
            draw.ellipse([lx + 8, ly + 3, lx + 16, ly + 11], outline=colour, width=2)
        draw.text((lx + 30, ly), label, fill=(20, 20, 20), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the DiTFastAttn paper's DiT runs: 50)")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--images", type=int, default=6, help="evaluation images")
    parser.add_argument("--calibration-images", type=int, default=2)
    parser.add_argument("--v1-thresholds", type=float, nargs="+", default=[0.025, 0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--v2-alphas", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4, 0.8],
                        help="V2 error budgets (the official way to run V2)")
    parser.add_argument("--v2-budgets", type=float, nargs="*", default=[0.3, 0.55],
                        help="V2 budgets on the attention FLOPs each (layer, step) may keep")
    parser.add_argument("--v2-alpha", type=float, default=0.1,
                        help="starting error budget of the --v2-budgets bisection")
    parser.add_argument("--v2plus-alphas", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4],
                        help="V2+ (V1's methods per head added to the candidates) error budgets")
    parser.add_argument("--v2plus-budgets", type=float, nargs="*", default=[0.2, 0.3, 0.4],
                        help="V2+ budgets on the attention FLOPs each (layer, step) may keep")
    parser.add_argument("--v2plus-candidates", nargs="+", default=list(RESIDUAL_CANDIDATES),
                        help="V2+ candidate set (default: fastattn.headwise.RESIDUAL_CANDIDATES; "
                             "ALL_CANDIDATES adds ASC per head)")
    parser.add_argument("--v2plus-label", default="V2+", choices=["V2+", "V2+ASC"],
                        help="version label of the V2+ rows (V2+ASC: measured with ASC per head added)")
    parser.add_argument("--residual-factor", type=int, default=8,
                        help="arrow factor of the band of V2+ residual heads (official ablation: 8)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["V1", "V2", "V2+"],
                        help="versions not measured in this run (their rows can come from --rows-from)")
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling runs per variant (minimum)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench/fastattn_quality"))
    parser.add_argument("--rows-from", type=Path, default=None,
                        help="also report the rows of an earlier run's JSON (same model and setup; not re-measured)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    cfg = model.config
    grid, tokens = cfg.grid, cfg.tokens
    head_dim = cfg.hidden // cfg.heads
    labels, noise = image_batch(args.images, cfg.num_classes, seed=1, first_class=0, size=cfg.image_size)
    cal_labels, cal_noise = image_batch(args.calibration_images, cfg.num_classes, seed=2,
                                        first_class=args.images, size=cfg.image_size)
    window = Window1D(tokens // 8, tokens // 8)
    shape = AttentionShape(tokens=tokens, heads=cfg.heads, head_dim=head_dim, rows=2 * args.images, cfg=True,
                           window=window)

    timer = TimedAttention()
    reference, _, _ = evaluate(model, labels, noise, args.steps, args.cfg, lambda: timer, None, 1)
    timer.seconds = 0.0
    _, full_seconds, _ = evaluate(model, labels, noise, args.steps, args.cfg, lambda: timer, None, 1)
    share = timer.seconds / full_seconds
    _, plain_seconds, _ = evaluate(model, labels, noise, args.steps, args.cfg, lambda: None, None,
                                   args.repeats)
    print(f"full attention: {plain_seconds:.2f} s per sampling run, attention-core share {share:.3f}", flush=True)

    rows, images, plans = [], {}, {}

    def record(version, budget_name, budget, plan, cost, runtime_factory, calibration_s, forwards):
        out, seconds, quality = evaluate(model, labels, noise, args.steps, args.cfg,
                                         lambda: runtime_attend(runtime_factory(), grid), reference, args.repeats)
        bound = (1 - share) + share * cost.core_fraction
        row = {"version": version, "key": f"{version} {budget_name} {budget:g}", budget_name: budget,
               "core_flops_kept": cost.core_fraction,
               "module_flops_kept": cost.module_fraction, **quality, "time_ratio": seconds / plain_seconds,
               "amdahl_bound_ratio": bound, "full_run_s": plain_seconds, "attention_core_share": share,
               "calibration_s": calibration_s, "calibration_forwards": forwards,
               "methods": plan.method_counts()}
        rows.append(row)
        images[row["key"]] = out
        plans[row["key"]] = plan
        print(f"{version} {budget_name} {budget:g}: FLOPs kept {cost.core_fraction:.3f}, PSNR {row['psnr']:.2f} dB, "
              f"SSIM {row['ssim']:.4f}, time {row['time_ratio']:.2f} (bound {bound:.2f}), calibration "
              f"{calibration_s:.0f} s", flush=True)

    for delta in ([] if "V1" in args.skip else args.v1_thresholds):
        sampler = DDIMSampler(model, cal_labels, cal_noise, args.steps, args.cfg)
        started = time.perf_counter()
        target = SteppedRuntimeTarget(
            cfg.depth, args.steps, window=window, advance=sampler.advance,
            model_output=lambda step, runtime, s=sampler: s.model_output(step, runtime_attend(runtime, grid)(step, s.rows)))
        search = calibrate_target(target, delta)
        seconds = time.perf_counter() - started
        plan = search.to_plan({"window": [tokens // 8] * 2, "token_grid": [grid, grid], "num_heads": cfg.heads,
                               "head_dim": head_dim, "cfg_scale": args.cfg})
        record("V1", "threshold", delta, plan, plan_cost(plan, shape), lambda p=plan: v1_runtime(p, window),
               seconds, sampler.forwards)

    v2_runs = []
    for version, candidates, alphas, budgets in (("V2", OFFICIAL_CANDIDATES, args.v2_alphas, args.v2_budgets),
                                                 (args.v2plus_label, tuple(args.v2plus_candidates), args.v2plus_alphas,
                                                  args.v2plus_budgets)):
        if ("V2+" if version.startswith("V2+") else version) in args.skip:
            continue
        common = dict(candidates=candidates, residual_window=args.residual_factor)
        v2_runs += [(version, "alpha", alpha, dict(alpha=alpha, **common)) for alpha in alphas]
        v2_runs += [(version, "flops_budget", budget, dict(alpha=args.v2_alpha, flops_kept=budget, **common))
                    for budget in budgets]
    for version, budget_name, budget, options in v2_runs:
        sampler = DDIMSampler(model, cal_labels, cal_noise, args.steps, args.cfg)
        started = time.perf_counter()
        calibration = calibrate_headwise(lambda runtime, s=sampler: s.run(runtime_attend(runtime, grid)),
                                         list(range(cfg.depth)), args.steps, **options)
        seconds = time.perf_counter() - started
        plan = calibration.to_plan(token_grid=[grid, grid], cfg_scale=args.cfg)
        record(version, budget_name, budget, plan, headwise_plan_cost(plan, rows=2 * args.images),
               lambda p=plan: runtime_for_plan(p), seconds, sampler.forwards)

    setup = (f"ImageDiT {cfg.depth} layers x {cfg.heads} heads x {head_dim}, {tokens} tokens ({grid}x{grid}), "
             f"{args.steps} DDIM steps, CFG {args.cfg:g}; calibrated on {args.calibration_images} images, "
             f"evaluated on {args.images} others; {platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    if args.rows_from is not None:
        earlier = json.loads(args.rows_from.read_text())
        if earlier["setup"] != setup or earlier["model"] != args.model.name:
            raise SystemExit(f"--rows-from {args.rows_from}: measured with another setup ({earlier['setup']}); "
                             f"this run is {setup}")
        known = {r["key"] for r in rows}
        rows.extend(r for r in earlier["rows"] if r["key"] not in known)

    comparison = []
    v1_ssim = [(r["core_flops_kept"], r["ssim"]) for r in rows if r["version"] == "V1"]
    v1_psnr = [(r["core_flops_kept"], r["psnr"]) for r in rows if r["version"] == "V1"]
    for r in (r for r in rows if r["version"] != "V1"):
        comparison.append({"version": r["version"], "flops_kept": r["core_flops_kept"], "v2_ssim": r["ssim"],
                           "v2_psnr": r["psnr"],
                           "v1_ssim_interpolated": interpolate(v1_ssim, r["core_flops_kept"]),
                           "v1_psnr_interpolated": interpolate(v1_psnr, r["core_flops_kept"])})

    result = {"setup": setup, "model": str(args.model.name), "full_run_s": plain_seconds,
              "attention_core_share": share, "rows": rows, "v2_vs_v1_at_equal_flops": comparison}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot_curves(rows, args.out.with_suffix(".png"), "DiTFastAttn on a trained 1,024-token DiT: "
                "quality against attention work kept (same seeds as full attention)")

    shown_versions = [v for v in ("V1", "V2", "V2+", "V2+ASC") if any(r["version"] == v and r["key"] in images for r in rows)]

    def nearest(version):
        """The row of this run nearest the goal's FLOPs (rows from --rows-from have no images)."""
        candidates = [r for r in rows if r["version"] == version and r["key"] in images]
        best = min(candidates, key=lambda r: abs(r["core_flops_kept"] - GOAL_FLOPS))
        return best, best["key"]

    from PIL import Image
    from fastattn.report import method_map_figure
    from reducio.contact_sheet import difference, save_contact_sheet
    shown = min(args.images, 6)
    columns = [("full attention", reference[:shown].transpose(0, 1))]
    for version in shown_versions:
        row, key = nearest(version)
        columns.append((f"{version} {row['core_flops_kept']:.0%} FLOPs", images[key][:shown].transpose(0, 1)))
    for version in shown_versions:
        _, key = nearest(version)
        columns.append((f"|{version} - full| x4", difference(images[key][:shown], reference[:shown]).transpose(0, 1)))
    save_contact_sheet(args.out.parent / f"{args.out.name}_sheet.png", columns, frames=list(range(shown)),
                       caption="rows: evaluation images (start noise and class as full attention); "
                               "'frame' = image index")
    for version in shown_versions:
        row, key = nearest(version)
        figure = method_map_figure(plans[key], shape if version == "V1" else None,
                                   title=f"{version} plan, {row['core_flops_kept']:.0%} attention FLOPs kept")
        name = version.lower().replace("+", "plus")
        Image.fromarray((figure * 255).round().astype(np.uint8)).save(
            args.out.parent / f"{args.out.name}_map_{name}.png")
    print("| version | budget | attention-core FLOPs kept | PSNR dB (min) | SSIM (min) | CPU time ratio | Amdahl bound "
          "| calibration s (forwards) | methods (cells: step x layer for V1, step x layer x head for V2) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["version"], r["core_flops_kept"])):
        budget = f"delta {r['threshold']:g}" if "threshold" in r else (
            f"alpha {r['alpha']:g}" if "alpha" in r else f"FLOPs <= {r['flops_budget']:g} per layer-step")
        methods = ", ".join(f"{k} {v}" for k, v in r["methods"].items())
        print(f"| {r['version']} | {budget} | {r['core_flops_kept']:.3f} | {r['psnr']:.2f} ({r['psnr_min']:.2f}) | "
              f"{r['ssim']:.4f} ({r['ssim_min']:.4f}) | {r['time_ratio']:.2f} | {r['amdahl_bound_ratio']:.2f} | "
              f"{r['calibration_s']:.0f} ({r['calibration_forwards']}) | {methods} |")
    print("| version | FLOPs kept | SSIM | V1 SSIM at equal FLOPs | PSNR | V1 PSNR at equal FLOPs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in sorted(comparison, key=lambda c: (c["version"], c["flops_kept"])):
        def fmt(value, digits):
            return "outside V1's range" if value is None else f"{value:.{digits}f}"
        print(f"| {c['version']} | {c['flops_kept']:.3f} | {c['v2_ssim']:.4f} | {fmt(c['v1_ssim_interpolated'], 4)} | "
              f"{c['v2_psnr']:.2f} | {fmt(c['v1_psnr_interpolated'], 2)} |")


if __name__ == "__main__":
    main()
