"""DiTFastAttnCalibrate: run the sampler once and produce a plan: V1 (greedy, layer-wise; the
default) or V2 (head-wise, under an error budget or an "attention FLOPs kept" budget)."""
from __future__ import annotations

import logging

from .._compat import io, ui
from ...fastattn.calibration import OFFICIAL_CANDIDATES
from ...fastattn.headwise import OFFICIAL_CANDIDATES as V2_CANDIDATES, RESIDUAL_CANDIDATES as V2_EXTENDED_CANDIDATES
from ...fastattn.headwise import candidate_method
from ...fastattn.plan import ASC, AST, WARS, WARS_ASC, WINDOW_SHAPES, window_tokens
from .calibrate import CalibrationSession, HeadwiseCalibrationSession
from .families import detect_family
from .patcher import WindowConfig, apply_patch
from .plan_io_nodes import filename_prefix_problem, save_plan_to_folder
from .report import method_map_image, plan_summary
from .sampling import sample_latent, sampling_choice_problem, weights_fingerprint_of
from .sockets import CATEGORY, DiTFastAttnPlan

log = logging.getLogger("reducio_fastattn.ditfastattn")

# Where a finished calibration goes when its own filename_prefix cannot be written after all.
FALLBACK_PREFIX = "ditfastattn/unsaved_calibration"


# Appended inputs (saved workflows store widget values by position): plan version, V2 budget and
# the V2 candidate set.
PLAN_VERSIONS = ("V1 layer-wise", "V2 head-wise")
V2_BUDGETS = ("error", "attention FLOPs kept")
V2_CANDIDATE_SETS = ("official: arrow + caching", "extended: + WA-RS per head")


def allowed_v2_candidates(allow_output_share: bool, allow_window: bool,
                          candidate_set: str = V2_CANDIDATE_SETS[0]) -> list[str]:
    """V2 candidates: head caching (AST per head, `allow_output_share`) and arrow attention
    (`allow_window`); the extended set adds V1's WA-RS per head (`allow_window`). ASC per head
    exists in fastattn.headwise but is not offered: measured harmful (bench/fastattn_quality.md)."""
    pool = V2_EXTENDED_CANDIDATES if candidate_set == V2_CANDIDATE_SETS[1] else V2_CANDIDATES
    return [c for c in pool if (allow_output_share if candidate_method(c).output_share else allow_window)]


def allowed_candidates(allow_output_share: bool, allow_window: bool, allow_cfg_share: bool) -> list[str]:
    allowed = {AST: allow_output_share, WARS: allow_window, ASC: allow_cfg_share,
               WARS_ASC: allow_window and allow_cfg_share}
    return [m for m in OFFICIAL_CANDIDATES if allowed[m]]


def calibrate_plan(model, *, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler,
                   denoise, threshold, window_fraction=0.125, window_shape="1d", candidates=OFFICIAL_CANDIDATES,
                   progress=None, interrupted=None, plan_version=PLAN_VERSIONS[0], v2_budget=V2_BUDGETS[0],
                   v2_alpha=0.3, v2_flops_kept=0.35):
    """Run the calibration sampling pass; return (plan, calibration latent, session).

    plan_version "V2 head-wise": ``candidates`` are V2 candidates (allowed_v2_candidates), the
    budget is ``v2_alpha`` (error) or ``v2_flops_kept`` (share of attention FLOPs the plan keeps);
    threshold is V1's and unused; the window settings are the band of WA-RS heads (extended set)."""
    family = detect_family(model)
    if family is None:
        name = type(getattr(model.model, "diffusion_model", None)).__name__
        raise ValueError(f"DiTFastAttn cannot calibrate {name}: supported families are Wan, "
                         f"Flux/Chroma, SD3, HunyuanVideo, LTXV, Cosmos-Predict2, PixArt and Reducio-DiT")
    if not candidates:
        raise ValueError("no compression method is allowed: enable at least one of "
                         "allow_output_share, allow_window, allow_cfg_share (V2: allow_output_share or "
                         "allow_window)")
    diffusion_model = model.model.diffusion_model
    layer_names = family.layer_names(diffusion_model)
    window = WindowConfig(shape=window_shape, fraction=window_fraction)
    if plan_version == PLAN_VERSIONS[1]:
        session = HeadwiseCalibrationSession(
            layer_names, v2_alpha, v2_flops_kept if v2_budget == V2_BUDGETS[1] else None, candidates,
            progress=progress, interrupted=interrupted, residual_window=window.factory())
    else:
        session = CalibrationSession(layer_names, threshold, candidates, progress=progress,
                                     interrupted=interrupted)
    patched, _ = apply_patch(model, plan=None, window=window, calibration=session, measure_time=True)
    out = sample_latent(patched, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                        scheduler=scheduler, positive=positive, negative=negative, latent=latent,
                        denoise=denoise)
    grid = family.token_grid(diffusion_model, out["samples"].shape)
    image_tokens = 1
    for g in grid:
        image_tokens *= g
    w = window_tokens(window.fraction, image_tokens)
    if session.version == "v2":      # arrow methods carry their own windows (metadata.arrow_windows)
        extra = {"scheduler": scheduler, "denoise": float(denoise), "seed": int(seed)}
        window_fields = {}
        if session.uses_residual:    # WA-RS heads use the window settings (recorded like V1's)
            window_fields["window"] = (w, w)
            extra.update({"window_shape": window.shape, "window_fraction": window.fraction})
        plan = session.to_plan(architecture=family.name, token_grid=tuple(grid),
                               weights_fingerprint=weights_fingerprint_of(model), extra=extra, **window_fields)
        return plan, out, session
    plan = session.to_plan(
        architecture=family.name, token_grid=tuple(grid),
        weights_fingerprint=weights_fingerprint_of(model), window=(w, w),
        extra={"window_shape": window.shape, "window_fraction": window.fraction,
               "scheduler": scheduler, "denoise": float(denoise), "seed": int(seed)})
    return plan, out, session


def input_problem(*, sampler_name=None, scheduler=None, window_shape=None, filename_prefix=None,
                  plan_version=None, v2_budget=None, v2_candidates=None) -> str | None:
    """The first widget value the calibrate node cannot use (``None`` = linked or not given)."""
    problem = sampling_choice_problem(sampler_name=sampler_name, scheduler=scheduler)
    if problem:
        return problem
    if plan_version is not None and plan_version not in PLAN_VERSIONS:
        return f"plan_version: {plan_version!r} is not one of {list(PLAN_VERSIONS)}"
    if v2_budget is not None and v2_budget not in V2_BUDGETS:
        return f"v2_budget: {v2_budget!r} is not one of {list(V2_BUDGETS)}"
    if v2_candidates is not None and v2_candidates not in V2_CANDIDATE_SETS:
        return f"v2_candidates: {v2_candidates!r} is not one of {list(V2_CANDIDATE_SETS)}"
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
                # Appended after the published inputs (widget values are stored by position);
                # optional so that saved API prompts without them still validate.
                io.Combo.Input("plan_version", options=list(PLAN_VERSIONS), default=PLAN_VERSIONS[0],
                               optional=True,
                               tooltip="'V1 layer-wise': the greedy search (threshold, window, allow_* "
                                       "inputs). 'V2 head-wise' (DiTFastAttnV2): per head full, arrow "
                                       "attention (text tokens global, image band per head, k = 8/16/32) "
                                       "or cached (v2_candidates 'extended': also WA-RS with the window "
                                       "inputs), chosen per layer and step by integer programming "
                                       "under the budget below; no extra model evaluations."),
                io.Combo.Input("v2_budget", options=list(V2_BUDGETS), default=V2_BUDGETS[0], optional=True,
                               tooltip="V2 only. 'error': the error budget v2_alpha per layer and step. "
                                       "'attention FLOPs kept': the smallest error budget whose plan keeps "
                                       "at most v2_flops_kept of the attention FLOPs."),
                io.Float.Input("v2_alpha", default=0.3, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="V2 error budget (sum of per-head relative squared errors per layer "
                                       "and step). Paper: SD3 0.05-0.3, FLUX 0.1-1.0."),
                io.Float.Input("v2_flops_kept", default=0.35, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="V2 'attention FLOPs kept' budget: share of the full-attention FLOPs "
                                       "the plan may keep (step 0 is always full attention; WA-RS residual "
                                       "refreshes are counted)."),
                io.Combo.Input("v2_candidates", options=list(V2_CANDIDATE_SETS), default=V2_CANDIDATE_SETS[0],
                               optional=True,
                               tooltip="V2 only. 'official': per head full, arrow attention or cached "
                                       "(DiTFastAttnV2's default). 'extended': also V1's WA-RS per head (a "
                                       "band of window_fraction / window_shape plus the residual cached at "
                                       "that head's last full step; allow_window). Measured on a trained DiT "
                                       "with the FLOPs budget: far better images at equal attention FLOPs "
                                       "(bench/fastattn_quality.md)."),
            ],
            outputs=[
                DiTFastAttnPlan.Output(display_name="plan"),
                io.Image.Output(display_name="method_map"),
                io.String.Output(display_name="report"),
                io.Latent.Output(display_name="calibration_latent"),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, window_shape=None, filename_prefix=None,
                        plan_version=None, v2_budget=None, v2_candidates=None):
        return input_problem(sampler_name=sampler_name, scheduler=scheduler, window_shape=window_shape,
                             filename_prefix=filename_prefix, plan_version=plan_version,
                             v2_budget=v2_budget, v2_candidates=v2_candidates) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise, threshold, window_fraction, window_shape, allow_output_share, allow_window,
                allow_cfg_share, filename_prefix, plan_version=PLAN_VERSIONS[0], v2_budget=V2_BUDGETS[0],
                v2_alpha=0.3, v2_flops_kept=0.35, v2_candidates=V2_CANDIDATE_SETS[0]) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        # Before sampling: a calibration can take hours, a typo must not cost them.
        problem = input_problem(sampler_name=sampler_name, scheduler=scheduler, window_shape=window_shape,
                                filename_prefix=filename_prefix, plan_version=plan_version, v2_budget=v2_budget,
                                v2_candidates=v2_candidates)
        if problem:
            raise ValueError(f"DiTFastAttnCalibrate: {problem}")
        bar = comfy.utils.ProgressBar(steps)
        plan, latent, session = calibrate_plan(
            model, positive=positive, negative=negative, latent=latent_image, seed=seed, steps=steps,
            cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
            threshold=threshold, window_fraction=window_fraction, window_shape=window_shape,
            candidates=(allowed_v2_candidates(allow_output_share, allow_window, v2_candidates)
                        if plan_version == PLAN_VERSIONS[1]
                        else allowed_candidates(allow_output_share, allow_window, allow_cfg_share)),
            plan_version=plan_version, v2_budget=v2_budget, v2_alpha=v2_alpha, v2_flops_kept=v2_flops_kept,
            progress=lambda done, total: bar.update_absolute(min(done, total), total),
            interrupted=comfy.model_management.throw_exception_if_processing_interrupted)
        saved_line = save_calibrated_plan(plan, filename_prefix)
        text = plan_summary(plan)
        if session.version == "v2":
            text += "\n" + session.summary()
        else:
            text += (f"\ncalibration: {session.search.forward_count} trial evaluations over {plan.num_steps} "
                     f"denoiser evaluations")
        if saved_line:
            text += "\n" + saved_line
        image = method_map_image(plan)
        log.info("%s", text.replace("\n", " | "))
        return io.NodeOutput(plan, image, text, latent, ui=ui.PreviewText(text))
