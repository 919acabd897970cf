"""DiTFastAttnCalibrate: run the sampler once with the greedy V1 search and produce a plan."""
from __future__ import annotations

import logging

from .._compat import io, ui
from ...fastattn.calibration import OFFICIAL_CANDIDATES
from ...fastattn.plan import ASC, AST, WARS, WARS_ASC, WINDOW_SHAPES
from .calibrate import CalibrationSession
from .families import detect_family
from .patcher import WindowConfig, apply_patch
from .plan_io_nodes import filename_prefix_problem, save_plan_to_folder
from .report import method_map_image, plan_summary
from .sampling import sample_latent, sampling_choice_problem, weights_fingerprint_of
from .sockets import CATEGORY, DiTFastAttnPlan

log = logging.getLogger("reducio_fastattn.ditfastattn")

# Where a finished calibration goes when its own filename_prefix cannot be written after all.
FALLBACK_PREFIX = "ditfastattn/unsaved_calibration"


def allowed_candidates(allow_output_share: bool, allow_window: bool, allow_cfg_share: bool) -> list[str]:
    allowed = {AST: allow_output_share, WARS: allow_window, ASC: allow_cfg_share,
               WARS_ASC: allow_window and allow_cfg_share}
    return [m for m in OFFICIAL_CANDIDATES if allowed[m]]


def calibrate_plan(model, *, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler,
                   denoise, threshold, window_fraction=0.125, window_shape="1d", candidates=OFFICIAL_CANDIDATES,
                   progress=None, interrupted=None):
    """Run the calibration sampling pass; return (plan, calibration latent, session)."""
    family = detect_family(model)
    if family is None or family.tagging == "unsupported":
        name = type(getattr(model.model, "diffusion_model", None)).__name__
        reason = f" ({family.unsupported_reason})" if family is not None else ""
        raise ValueError(f"DiTFastAttn cannot calibrate {name}{reason}: supported families are Wan, "
                         f"Flux/Chroma, SD3, HunyuanVideo, LTXV, Cosmos-Predict2, PixArt and Reducio-DiT")
    if not candidates:
        raise ValueError("no compression method is allowed: enable at least one of "
                         "allow_output_share, allow_window, allow_cfg_share")
    diffusion_model = model.model.diffusion_model
    layer_names = family.layer_names(diffusion_model)
    session = CalibrationSession(layer_names, threshold, candidates, progress=progress,
                                 interrupted=interrupted)
    window = WindowConfig(shape=window_shape, fraction=window_fraction)
    patched, _ = apply_patch(model, plan=None, window=window, calibration=session, measure_time=True)
    out = sample_latent(patched, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                        scheduler=scheduler, positive=positive, negative=negative, latent=latent,
                        denoise=denoise)
    grid = family.token_grid(diffusion_model, out["samples"].shape)
    image_tokens = 1
    for g in grid:
        image_tokens *= g
    w = int(round(window.fraction * image_tokens))
    plan = session.to_plan(
        architecture=family.name, token_grid=tuple(grid),
        weights_fingerprint=weights_fingerprint_of(model), window=(w, w),
        extra={"window_shape": window.shape, "window_fraction": window.fraction,
               "scheduler": scheduler, "denoise": float(denoise), "seed": int(seed)})
    return plan, out, session


def input_problem(*, sampler_name=None, scheduler=None, window_shape=None, filename_prefix=None) -> str | None:
    """The first widget value the calibrate node cannot use (``None`` = linked or not given)."""
    problem = sampling_choice_problem(sampler_name=sampler_name, scheduler=scheduler)
    if problem:
        return problem
    if window_shape is not None and window_shape not in WINDOW_SHAPES:
        return f"window_shape: {window_shape!r} is not one of {list(WINDOW_SHAPES)}"
    if filename_prefix is not None and filename_prefix.strip():
        return filename_prefix_problem(filename_prefix)
    return None


def save_calibrated_plan(plan, filename_prefix: str) -> str | None:
    """Save a finished calibration; never lose it. Returns the report line (None: not asked to save).

    The prefix was checked before sampling, but saving can still fail (a file where a sub-folder
    should be, permissions, a full disk): then the plan goes under FALLBACK_PREFIX and the report
    says so. If even that fails, the plan still leaves the node on its output.
    """
    if not filename_prefix.strip():
        return None
    try:
        return f"saved: models/ditfastattn_plans/{save_plan_to_folder(plan, filename_prefix)}"
    except (OSError, ValueError) as error:
        first_error = error
    log.warning("DiTFastAttnCalibrate: could not save the plan as %r (%s); saving it under %r instead",
                filename_prefix, first_error, FALLBACK_PREFIX)
    try:
        fallback = save_plan_to_folder(plan, FALLBACK_PREFIX)
    except (OSError, ValueError) as error:
        log.error("DiTFastAttnCalibrate: could not save the plan at all (%s); it is only on the node's plan "
                  "output now: connect DiTFastAttnSavePlan to keep it", error)
        return (f"NOT SAVED: could not save as {filename_prefix!r} ({first_error}) nor under {FALLBACK_PREFIX!r} "
                f"({error}); connect DiTFastAttnSavePlan to the plan output to keep it")
    return (f"could not save as {filename_prefix!r} ({first_error}); saved instead: "
            f"models/ditfastattn_plans/{fallback}")


class DiTFastAttnCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="DiTFastAttnCalibrate",
            display_name="DiTFastAttn Calibrate",
            category=CATEGORY,
            description="Sample once (like KSampler, same inputs) while searching, per denoiser "
                        "evaluation and layer, the most compressing attention method whose output "
                        "error stays under the threshold (DiTFastAttn V1 greedy search). Costs up to "
                        "2 + 4 x layers model evaluations per step. The plan is saved under "
                        "models/ditfastattn_plans and works with the same sampler, scheduler, steps, "
                        "denoise, cfg and resolution.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to calibrate for (apply LoRAs "
                                                "and model-sampling nodes before this node)."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning of the calibration run."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="Latent that fixes resolution / frames and batch."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed of the calibration run."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps (the plan is "
                                                                            "tied to them)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale; with cfg = 1 there is no uncond pass and CFG "
                                       "sharing (ASC) never applies."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler; the plan is indexed by denoiser evaluation, so it is "
                                       "tied to the sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler (the plan records the sigma schedule)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise strength, as in KSampler."),
                io.Float.Input("threshold", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Error budget delta: layer i accepts a method when the output "
                                       "error is below (i+1)/L x delta. Paper: 0.025 (mild) to 0.15 "
                                       "(aggressive)."),
                io.Float.Input("window_fraction", default=0.125, min=0.01, max=1.0, step=0.005,
                               tooltip="Window attention reach per side, as a fraction of the image "
                                       "tokens (paper: 1/8). Text tokens always stay global."),
                io.Combo.Input("window_shape", options=list(WINDOW_SHAPES), default="1d",
                               tooltip="'1d': the paper's band over the flattened tokens; 'grid': a "
                                       "box over the (frame,) row, column token grid, covering about "
                                       "2 x window_fraction of the tokens (better for video)."),
                io.Boolean.Input("allow_output_share", default=True,
                                 tooltip="Allow AST: reuse the layer's attention output of the "
                                         "previous evaluation."),
                io.Boolean.Input("allow_window", default=True,
                                 tooltip="Allow WA-RS: window attention plus the residual cached at the "
                                         "last full step."),
                io.Boolean.Input("allow_cfg_share", default=True,
                                 tooltip="Allow ASC: compute attention for the positive prompt only "
                                         "and reuse it for the negative one."),
                io.String.Input("filename_prefix", default="ditfastattn/plan",
                                tooltip="Where the plan is saved inside models/ditfastattn_plans "
                                        "(empty: do not save)."),
            ],
            outputs=[
                DiTFastAttnPlan.Output(display_name="plan"),
                io.Image.Output(display_name="method_map"),
                io.String.Output(display_name="report"),
                io.Latent.Output(display_name="calibration_latent"),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, window_shape=None, filename_prefix=None):
        return input_problem(sampler_name=sampler_name, scheduler=scheduler, window_shape=window_shape,
                             filename_prefix=filename_prefix) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise, threshold, window_fraction, window_shape, allow_output_share, allow_window,
                allow_cfg_share, filename_prefix) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        # Before sampling: a calibration can take hours, a typo must not cost them.
        problem = input_problem(sampler_name=sampler_name, scheduler=scheduler, window_shape=window_shape,
                                filename_prefix=filename_prefix)
        if problem:
            raise ValueError(f"DiTFastAttnCalibrate: {problem}")
        bar = comfy.utils.ProgressBar(steps)
        plan, latent, session = calibrate_plan(
            model, positive=positive, negative=negative, latent=latent_image, seed=seed, steps=steps,
            cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            threshold=threshold, window_fraction=window_fraction, window_shape=window_shape,
            candidates=allowed_candidates(allow_output_share, allow_window, allow_cfg_share),
            progress=lambda done, total: bar.update_absolute(min(done, total), total),
            interrupted=comfy.model_management.throw_exception_if_processing_interrupted)
        saved_line = save_calibrated_plan(plan, filename_prefix)
        text = plan_summary(plan)
        text += f"\ncalibration: {session.search.forward_count} trial evaluations over {plan.num_steps} denoiser evaluations"
        if saved_line:
            text += "\n" + saved_line
        image = method_map_image(plan)
        log.info("%s", text.replace("\n", " | "))
        return io.NodeOutput(plan, image, text, latent, ui=ui.PreviewText(text))
