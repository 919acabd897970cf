"""Tier 2: a tiny Reducio-DiT as a native ComfyUI model, sampled by ComfyUI's own KSampler in process.

Checks the loader, the sampling settings, the text padding / CFG batching, the attention override and
block-replace surface DiTFastAttn relies on, agreement with the stand-alone pipeline, and bad inputs.
"""
import pytest
import torch

from reducio.dit import ReducioDiT, get_config, save_checkpoint
from reducio.dit.sampling import training_sigmas
from reducio.pipeline import Conditions, sample_motion_latent

SEED = 7


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    model = ReducioDiT(get_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def dit_file(comfy, tiny_dit):
    folder = comfy.models_folder("reducio")
    save_checkpoint(tiny_dit, folder / "tiny_reducio_dit.safetensors")
    return "tiny_reducio_dit.safetensors"


@pytest.fixture(scope="module")
def model(comfy, dit_file):
    (patcher,) = comfy.execute("ReducioDiTLoader", dit_name=dit_file, weight_dtype="fp32")
    return patcher


def conditionings(uncond=(1.0, 0.0, 0.0), text_len=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, text_len, 32, generator=g)
    clip = torch.randn(1, 4, 32, generator=g)
    content = torch.randn(1, 4, 32, 32, generator=g)
    extra = {"reducio_clip_tokens": clip, "reducio_content_latent": content}
    positive = [[text, {**extra, "reducio_drop": torch.zeros(1, 3)}]]
    negative = [[torch.randn(1, 3, 32, generator=g), {**extra, "reducio_drop": torch.tensor([uncond])}]]
    return positive, negative, Conditions(text=text, text_mask=None, clip=clip, content_latent=content)


def sample(comfy, model, positive, negative, steps=3, cfg=4.5, sampler="dpmpp_2m", scheduler="normal"):
    latent = {"samples": torch.zeros(1, 16, 4, 8, 8)}
    (out,) = comfy.nodes.common_ksampler(model, SEED, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


def test_loader_builds_a_native_eps_model_on_the_linear_schedule(comfy, model, tiny_dit):
    from comfy import model_base

    base = model.model
    assert base.model_type == model_base.ModelType.EPS
    assert base.latent_format.latent_channels == 16 and base.latent_format.latent_dimensions == 3
    assert base.latent_format.scale_factor == 1.0
    # "sqrt_linear" in ComfyUI is plain linear betas: sigmas equal our own schedule
    assert torch.allclose(base.model_sampling.sigmas, training_sigmas(), rtol=1e-5)
    for key, value in tiny_dit.state_dict().items():
        assert torch.equal(base.diffusion_model.state_dict()[key].float(), value), key


def test_ksampler_matches_the_standalone_pipeline(comfy, model, tiny_dit):
    positive, negative, cond = conditionings()
    latent = sample(comfy, model, positive, negative)
    assert latent.shape == (1, 16, 4, 8, 8) and torch.isfinite(latent).all()
    reference = sample_motion_latent(tiny_dit, cond, height=256, width=256, steps=3, cfg=4.5, seed=SEED)
    assert (latent - reference).abs().max() < 1e-3 * reference.abs().max()


def test_uncond_modes_change_the_result(comfy, model):
    positive, negative, _ = conditionings((1.0, 0.0, 0.0))
    null_text = sample(comfy, model, positive, negative)
    positive, negative, _ = conditionings((1.0, 1.0, 1.0))
    null_all = sample(comfy, model, positive, negative)
    positive, negative, _ = conditionings((0.0, 0.0, 0.0))
    negative_prompt = sample(comfy, model, positive, negative)
    assert not torch.allclose(null_text, null_all) and not torch.allclose(null_text, negative_prompt)


def test_override_wrappers_and_block_replace_reach_every_block(comfy, model):
    from comfy import patcher_extension

    calls, wrapped, replaced = [], [], []

    def override(func, *args, **kwargs):
        opts = kwargs["transformer_options"]
        calls.append((opts["block_index"], opts["attn_kind"], opts["total_blocks"], tuple(opts["cond_or_uncond"]),
                      opts["token_grid"], args[0].shape[0]))
        return func(*args, **kwargs)

    def diffusion_wrapper(executor, *args, **kwargs):
        wrapped.append(args[0].shape)
        return executor(*args, **kwargs)

    def block_replace(args, extra):
        replaced.append(args["img"].shape)
        args["transformer_options"]["seen_by_replace"] = True
        return extra["original_block"](args)

    patched = model.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = override
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", diffusion_wrapper)
    patched.set_model_patch_replace(block_replace, "dit", "double_block", 2)
    positive, negative, _ = conditionings()
    out = sample(comfy, patched, positive, negative, steps=2)
    plain = sample(comfy, model, positive, negative, steps=2)
    assert torch.allclose(out, plain, atol=1e-5)  # pass-through patches leave the result unchanged
    assert len(wrapped) == 2 and wrapped[0] == (2, 16, 4, 8, 8)   # cond + uncond in one batch
    assert len(replaced) == 2
    per_eval = [(i, kind) for i in range(4) for kind in ("self", "cross")]
    assert [c[:2] for c in calls] == per_eval * 2
    assert all(c[2] == 4 and c[3] == (1, 0) and c[4] == (4, 8, 8) and c[5] == 2 for c in calls)

    def zero_self_attention(func, *args, **kwargs):
        if kwargs["transformer_options"]["attn_kind"] == "self":
            return torch.zeros_like(args[0])
        return func(*args, **kwargs)

    changed = model.clone()
    changed.model_options["transformer_options"]["optimized_attention_override"] = zero_self_attention
    assert not torch.allclose(sample(comfy, changed, positive, negative, steps=2), plain)


def test_text_of_different_lengths_is_padded_into_one_batch(comfy, model):
    positive, negative, _ = conditionings(text_len=11)  # longer than the tiny model's 8 tokens: truncated
    shapes = []

    def wrapper(executor, *args, **kwargs):
        shapes.append((args[0].shape[0], args[2].shape))
        return executor(*args, **kwargs)

    from comfy import patcher_extension

    patched = model.clone()
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, "shapes", wrapper)
    sample(comfy, patched, positive, negative, steps=1)
    assert shapes == [(2, torch.Size([2, 8, 32]))]


def test_other_samplers_and_cfg_one(comfy, model):
    positive, negative, _ = conditionings()
    for sampler, scheduler in (("euler", "simple"), ("uni_pc", "karras")):
        assert torch.isfinite(sample(comfy, model, positive, negative, 2, 3.0, sampler, scheduler)).all()
    assert torch.isfinite(sample(comfy, model, positive, negative, 2, 1.0)).all()


def test_renormalize_node(comfy):
    latent = {"samples": torch.randn(2, 16, 4, 8, 8) * 3 + 1}
    (out,) = comfy.execute("ReducioRenormalizeLatent", samples=latent)
    flat = out["samples"].reshape(2, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(2), atol=1e-3)


# ------------------------------------------------------------------------------------------ bad input
def test_loader_rejects_a_pixart_file_and_names_the_converter(comfy):
    from safetensors.torch import save_file

    folder = comfy.models_folder("reducio")
    save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
               "pos_embed": torch.zeros(1, 4, 8)}, str(folder / "PixArt-tiny.safetensors"))
    with pytest.raises(ValueError, match="PixArt-alpha checkpoint.*reducio.convert pixart"):
        comfy.execute("ReducioDiTLoader", dit_name="PixArt-tiny.safetensors", weight_dtype="default")


def test_loader_rejects_a_file_without_config(comfy, tiny_dit):
    from safetensors.torch import save_file

    folder = comfy.models_folder("reducio")
    save_file({k: v.contiguous() for k, v in tiny_dit.state_dict().items()}, str(folder / "bare.safetensors"))
    with pytest.raises(ValueError, match="no Reducio-DiT config"):
        comfy.execute("ReducioDiTLoader", dit_name="bare.safetensors", weight_dtype="default")


def test_wrong_text_encoder_width_is_explained(comfy, model):
    positive, negative, _ = conditionings()
    positive = [[torch.randn(1, 5, 768), positive[0][1]]]
    with pytest.raises(ValueError, match="T5 text tokens of width 32"):
        sample(comfy, model, positive, negative, steps=1)


def test_missing_clip_tokens_are_explained_for_a_clip_conditioned_dit(comfy, model):
    """ReducioImageToVideo's clip_vision is optional (for reduced-conditioning DiTs); a DiT that reads
    CLIP tokens says what to connect instead of silently using its null embedding."""
    positive, negative, _ = conditionings()
    for cond in (positive, negative):
        cond[0][1].pop("reducio_clip_tokens")
    with pytest.raises(ValueError, match="connect a CLIP vision model"):
        sample(comfy, model, positive, negative, steps=1)


def test_bf16_weights_run(comfy, dit_file):
    (patcher,) = comfy.execute("ReducioDiTLoader", dit_name=dit_file, weight_dtype="bf16")
    positive, negative, _ = conditionings()
    assert torch.isfinite(sample(comfy, patcher, positive, negative, steps=2)).all()


def test_ditfastattn_calibrates_and_applies_on_reducio_dit(comfy, model):
    """The pack's DiTFastAttn nodes recognise Reducio-DiT (block_index / attn_kind published by the model),
    calibrate a plan on it and sample with the plan applied."""
    if "DiTFastAttnCalibrate" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("DiTFastAttn nodes not in this build")
    positive, negative, _ = conditionings()
    latent = {"samples": torch.zeros(1, 16, 4, 8, 8)}
    plan, _, report, _ = comfy.execute(
        "DiTFastAttnCalibrate", model=model, positive=positive, negative=negative, latent_image=latent, seed=SEED,
        steps=4, cfg=4.5, sampler_name="dpmpp_2m", scheduler="normal", denoise=1.0, threshold=0.5,
        window_fraction=0.25, window_shape="1d", allow_output_share=True, allow_window=True, allow_cfg_share=True,
        filename_prefix="")
    assert isinstance(report, str) and report
    assert "AST" in report or "window" in report.lower()
    (patched,) = comfy.execute("DiTFastAttnApply", model=model, plan=plan, enabled=True, allow_remap=False,
                               ignore_model_mismatch=False, measure_time=False)
    fast = sample(comfy, patched, positive, negative, steps=4)
    full = sample(comfy, model, positive, negative, steps=4)
    assert torch.isfinite(fast).all()
    # a generous threshold makes the plan compress something, so the result moves, but stays close
    assert not torch.equal(fast, full)
    assert (fast - full).abs().mean() < full.abs().mean()
