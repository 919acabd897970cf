"""DiTFastAttn in ComfyUI: patched vs unpatched sampling wall time on random native Wan models (CPU).

Runs real ComfyUI sampling (nodes.common_ksampler) in-process. For each model size and plan it
reports the whole-run wall time, the measured time of the compressible attention calls, the
attention FLOPs kept and the bound they imply. CPU only, 2 shared cores: read the ratios, not the
absolute times (a GPU with a real window kernel behaves differently).

    COMFYUI_PATH=~/comfy/ComfyUI ~/comfy/ComfyUI/venv/bin/python -m bench.bench_comfy_fastattn
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from testkit import fastattn_tiny as tiny
from testkit.comfyui import InProcessComfy, locate_comfyui

STEPS = 6


def plans(fa, model):
    layers = fa.families.detect_family(model).layer_names(model.model.diffusion_model)
    meta = {"layer_names": layers, "extra": {"window_shape": "1d", "window_fraction": 0.125}}

    def plan(method):
        return fa.Plan([["full_attn"] * len(layers)] + [[method] * len(layers)] * (STEPS - 1), meta)

    return {"all full (overhead)": plan("full_attn"), "WA-RS after step 0": plan("residual_window_attn"),
            "AST after step 0": plan("output_share"), "ASC after step 0": plan("full_attn+cfg_attn_share")}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench(fa, label, model, latent, length):
    import torch

    pos, neg = tiny.conditioning(length, seed=1), tiny.conditioning(length, seed=2)
    fa.sample(model, pos, neg, latent, steps=1)                     # warm-up (load, allocations)
    ref, base_seconds = timed(lambda: fa.sample(model, pos, neg, latent, steps=STEPS))
    rows = [f"| {label} | unpatched | {base_seconds:.2f} | 1.00x | – | – | – | – |"]
    for name, plan in plans(fa, model).items():
        patched = fa.apply(model, plan, measure_time=True)   # the report's attention times
        out, seconds = timed(lambda: fa.sample(patched, pos, neg, latent, steps=STEPS))
        report = fa.patcher.installed_spec(patched).sink.last
        err = float((out - ref).norm() / ref.norm())
        attn = (f"{report.attention_seconds:.2f} / {report.full_estimate_seconds:.2f}"
                if report.full_estimate_seconds else f"{report.attention_seconds:.2f} / –")
        rows.append(f"| {label} | {name} | {seconds:.2f} | {base_seconds / seconds:.2f}x | "
                    f"{100 * report.flops_kept:.1f}% | {report.flops_bound_speedup:.2f}x | {attn} | {err:.3g} |")
        assert torch.isfinite(out).all()
    # the same unpatched run again: the spread between the two is the noise of this machine
    _, again = timed(lambda: fa.sample(model, pos, neg, latent, steps=STEPS))
    rows.append(f"| {label} | unpatched, repeated | {again:.2f} | {base_seconds / again:.2f}x | – | – | – | – |")
    return rows


def main():
    comfy = InProcessComfy(locate_comfyui(), Path(tempfile.mkdtemp(prefix="dfa_bench_")))
    fa = tiny.PackModules(comfy)
    import torch

    torch.manual_seed(0)
    rows = []
    # tiny: the test model (48 tokens); large: 2,048 self-attention tokens per sample
    rows += bench(fa, "Wan tiny (dim 64, 2 layers, 48 tokens)", tiny.tiny_wan(seed=0),
                  tiny.video_latent(frames=3, size=8), 7)
    rows += bench(fa, "Wan random (dim 256, 4 layers, 2048 tokens)",
                  tiny.tiny_wan(seed=0, dim=256, layers=4, heads=2), tiny.video_latent(frames=8, size=32), 7)
    header = ("| model | plan | sampling s | vs unpatched | attention FLOPs kept | FLOPs bound | "
              "attention s (measured / full estimate) | rel. L2 vs unpatched |\n|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
