"""DiTFastAttnApply: MODEL + plan -> a patched clone (the input MODEL is never modified)."""
from __future__ import annotations

from .._compat import io
from ...fastattn.plan import RunSignature
from .families import detect_family
from .patcher import WindowConfig, apply_patch, remove_patch
from .sampling import weights_fingerprint_of
from .sockets import CATEGORY, DiTFastAttnPlan


def window_config_of(plan) -> WindowConfig:
    extra = dict(plan.metadata.extra or {})
    # Types and ranges were checked when the plan was loaded (fastattn.plan).
    return WindowConfig(shape=extra.get("window_shape", "1d"), fraction=extra.get("window_fraction", 0.125))


def patch_model_with_plan(model, plan, *, allow_remap=False, ignore_model_mismatch=False,
                          measure_time=False):
    """The node's logic without the node (also used by tests and the bench)."""
    family = detect_family(model)
    ignore = ("weights_fingerprint", "architecture") if ignore_model_mismatch else ()
    if family is not None and family.tagging != "unsupported":
        model_signature = RunSignature(num_layers=len(family.layer_names(model.model.diffusion_model)),
                                       architecture=family.name,
                                       weights_fingerprint=weights_fingerprint_of(model))
        plan.check(model_signature, ignore=ignore)    # clear error now, not mid-sampling
    patched, _ = apply_patch(model, plan=plan, window=window_config_of(plan), allow_remap=allow_remap,
                             ignore=ignore, measure_time=measure_time,
                             signature=RunSignature(architecture=family.name if family else None))
    return patched


class DiTFastAttnApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTFastAttnApply",
            display_name="DiTFastAttn Apply Plan",
            category=CATEGORY,
            description="Patch a native DiT (Wan, Flux/Chroma, SD3, HunyuanVideo, LTXV, Cosmos-Predict2, Reducio-DiT) "
                        "with a DiTFastAttn plan: window attention with residual sharing, attention "
                        "sharing across steps and across CFG, per layer and step. Returns a clone; "
                        "other patches (LoRA, SageAttention overrides, EasyCache, TorchCompile) stack.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to accelerate (the plan must "
                                                "have been calibrated on this model)."),
                DiTFastAttnPlan.Input("plan", tooltip="A plan from DiTFastAttnCalibrate or "
                                                      "DiTFastAttnLoadPlan."),
                io.Boolean.Input("enabled", default=True,
                                 tooltip="Off: return the model without DiTFastAttn (also removes "
                                         "an earlier DiTFastAttn patch); handy for A/B runs."),
                io.Boolean.Input("allow_remap", default=False,
                                 tooltip="If the sampler, steps, scheduler or denoise differ from the "
                                         "calibration run, map plan steps by noise level instead of "
                                         "refusing. Quality may drop; recalibrating is better."),
                io.Boolean.Input("ignore_model_mismatch", default=False,
                                 tooltip="Use the plan even if it was calibrated on other weights "
                                         "(another checkpoint or fine-tune). Layer counts must match."),
                io.Boolean.Input("measure_time", default=False,
                                 tooltip="Time every compressed attention call for the run report. "
                                         "Off by default: it adds a GPU synchronise per call, which "
                                         "costs the speed this node is for; turn on to compare."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, plan, enabled=True, allow_remap=False, ignore_model_mismatch=False,
                measure_time=False) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(remove_patch(model))
        return io.NodeOutput(patch_model_with_plan(model, plan, allow_remap=allow_remap,
                                                   ignore_model_mismatch=ignore_model_mismatch,
                                                   measure_time=measure_time))
