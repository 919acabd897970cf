"""Run reports and an A/B comparison against the unpatched model on the same seed."""
from __future__ import annotations

import json
import math

import torch

from .._compat import io, ui
from .patcher import installed_spec, remove_patch
from .sampling import sample_latent, sampling_choice_problem
from .sockets import CATEGORY


def latent_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """PSNR (over the reference's value range) and relative L2 error between two latents."""
    a, b = a.float(), b.float()
    mse = float(torch.mean((a - b) ** 2))
    value_range = float(b.max() - b.min()) or 1.0
    psnr = math.inf if mse == 0 else 10.0 * math.log10(value_range ** 2 / mse)
    rel = float(torch.linalg.vector_norm(a - b) / (torch.linalg.vector_norm(b) + 1e-12))
    return {"latent_psnr_db": psnr, "relative_l2": rel, "max_abs": float((a - b).abs().max())}


class DiTFastAttnReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTFastAttnReport",
            display_name="DiTFastAttn Run Report",
            category=CATEGORY,
            description="Show what the last sampling run of a DiTFastAttn-patched model did: methods "
                        "used, attention FLOPs kept, measured attention time vs full attention.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The patched model (output of DiTFastAttnApply, or a "
                                                "clone of it) that the sampler used."),
                io.Latent.Input("samples", tooltip="The sampler's output: connects the report after "
                                                   "the run it describes."),
            ],
            outputs=[io.String.Output(display_name="report"), io.String.Output(display_name="report_json")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, samples):
        return float("nan")   # the report of the latest run, never a cached one

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        spec = installed_spec(model)
        if spec is None:
            text = "DiTFastAttn: this model is not patched (no DiTFastAttnApply upstream)."
            return io.NodeOutput(text, "{}", ui=ui.PreviewText(text))
        report = spec.sink.last
        if report is None:
            text = "DiTFastAttn: the patched model has not been sampled yet."
            return io.NodeOutput(text, "{}", ui=ui.PreviewText(text))
        text = report.to_text()
        return io.NodeOutput(text, json.dumps(report.to_dict()), ui=ui.PreviewText(text))


class DiTFastAttnCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="DiTFastAttnCompare",
            display_name="DiTFastAttn Compare With Full Attention",
            category=CATEGORY,
            description="Sample the patched model and the same model without DiTFastAttn on the same "
                        "seed and settings; output both latents (decode them side by side) and the "
                        "difference and timing.",
            inputs=[
                io.Model.Input("model", tooltip="A DiTFastAttn-patched model."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Latent.Input("latent_image", tooltip="Input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed used for both runs."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Denoise."),
            ],
            outputs=[io.Latent.Output(display_name="patched"), io.Latent.Output(display_name="full_attention"),
                     io.String.Output(display_name="comparison")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None):
        return sampling_choice_problem(sampler_name=sampler_name, scheduler=scheduler) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise) -> io.NodeOutput:
        import time

        problem = sampling_choice_problem(sampler_name=sampler_name, scheduler=scheduler)
        if problem:
            raise ValueError(f"DiTFastAttnCompare: {problem}")

        settings = dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                        positive=positive, negative=negative, latent=latent_image, denoise=denoise)
        started = time.perf_counter()
        patched = sample_latent(model, **settings)
        patched_seconds = time.perf_counter() - started
        started = time.perf_counter()
        reference = sample_latent(remove_patch(model), **settings)
        full_seconds = time.perf_counter() - started
        diff = latent_difference(patched["samples"], reference["samples"])
        spec = installed_spec(model)
        report = spec.sink.last if spec is not None else None
        lines = [f"patched run {patched_seconds:.2f} s, unpatched run {full_seconds:.2f} s "
                 f"(whole sampling, {full_seconds / max(patched_seconds, 1e-9):.2f}x)",
                 f"latent PSNR {diff['latent_psnr_db']:.2f} dB, relative L2 {diff['relative_l2']:.4f}"]
        if report is not None:
            lines.append(report.summary_line())
        text = "\n".join(lines)
        return io.NodeOutput(patched, reference, text, ui=ui.PreviewText(text))
