"""Run one KSampler-equivalent sampling pass through ComfyUI's public sampling API.

Used by the calibrate and compare nodes. It calls ``comfy.sample.sample`` the way the stock
KSampler does (same noise from the seed, same latent handling), so a plan calibrated here sees
exactly the run a KSampler with the same settings makes.
"""
from __future__ import annotations

import torch


# Denoiser evaluations per sampling step of ComfyUI's samplers, by the name the run reports
# (``sampler_function.__name__`` without "sample_", which is what plans record): what lets a plan
# without a recorded sigma schedule be checked against a run before it starts. Counted on ComfyUI
# 0.3.64 and 0.8.0 (tests/comfy/test_fastattn_step_count.py re-counts a sample of them). Multi-stage
# samplers take a single (Euler) evaluation on the final step to sigma 0. Samplers not listed here
# (adaptive ones such as dpm_adaptive, heunpp2, custom samplers) are checked as the run goes.
EVALUATIONS_PER_STEP = {
    **dict.fromkeys((
        "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "lms", "dpm_fast_function",
        "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
        "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis",
        "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
        "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "sa_solver", "unipc", "unipc_bh2"), 1),
    **dict.fromkeys((
        "heun", "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
        "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2", "sa_solver_pece"), 2),
    "seeds_3": 3,
}


def expected_evaluations(sampler_name, sigmas) -> int | None:
    """Denoiser evaluations a run of ``sampler_name`` over ``sigmas`` (steps + 1 values) makes,
    or None when that is not known before the run."""
    per_step = EVALUATIONS_PER_STEP.get(sampler_name)
    if per_step is None:
        return None
    return sum(1 if float(sigma) == 0.0 else per_step for sigma in list(sigmas)[1:])


def sampling_choice_problem(*, sampler_name=None, scheduler=None) -> str | None:
    """Why a sampler / scheduler name is unusable, or None. ComfyUI 0.3.64 does not check V3 combo
    values itself, and an unknown sampler name would otherwise run as another sampler."""
    import comfy.samplers

    if sampler_name is not None and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        return f"sampler_name: {sampler_name!r} is not a sampler of this ComfyUI (e.g. 'euler', 'dpmpp_2m')"
    if scheduler is not None and scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        return (f"scheduler: {scheduler!r} is not one of this ComfyUI's schedulers "
                f"{list(comfy.samplers.KSampler.SCHEDULERS)}")
    return None


def sample_latent(model, *, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                  denoise=1.0):
    import comfy.sample
    import comfy.utils

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
        denoise=denoise, noise_mask=latent.get("noise_mask"),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = dict(latent)
    out["samples"] = samples
    return out


def weights_fingerprint_of(model_patcher) -> str:
    """Fingerprint of the base weights (LoRA patches applied in memory are looked through)."""
    from ...fastattn.plan import weights_fingerprint

    diffusion_model = model_patcher.model.diffusion_model
    tensors = dict(diffusion_model.state_dict(keep_vars=False))
    # When the model is loaded with weight patches, ModelPatcher keeps the originals in backup.
    for key, backup in getattr(model_patcher, "backup", {}).items():
        name = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else None
        weight = getattr(backup, "weight", None)
        if name in tensors and torch.is_tensor(weight):
            tensors[name] = weight
    return weights_fingerprint(tensors.items())
